"""CheckpointManager: commits, retention against a reference model, last-good resume,
in-place resume with the optimizer, block=False saves, the directory lock, leftovers of
killed saves, and format="dcp" with gloo ranks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _manager_worker as worker
import pytest
import tensorfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorfile._manager import LOCK_NAME, retained

torch = pytest.importorskip("torch")

WORKER = str(Path(__file__).with_name("_manager_worker.py"))


def _obj(step: int) -> dict[str, Any]:
    return {"step": step, "w": torch.full((16,), float(step)), "tag": f"s{step}"}


def _flip_byte(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _first_storage_offset(path: str) -> int:
    from tensorfile._reader import open_reader

    with open_reader(path) as r:
        return int(r.layout.storage_offsets[0])


def _names(directory: Path) -> set[str]:
    return set(os.listdir(directory))


# --------------------------------------------------------------------------- basics


def test_save_commits_one_file_per_step_readable_by_plain_tensorfile(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.steps() == [] and mgr.latest() is None
        for step in (100, 200, 300):
            assert mgr.save(step, _obj(step), metrics={"loss": step / 1000}) is None
        mgr.save(
            400, _obj(400), metrics={"loss": torch.tensor(0.25), "ok": True}, metadata={"run": "a"}
        )
        assert mgr.steps() == [100, 200, 300, 400]
        assert mgr.latest() == 400
        assert mgr.metrics(200) == {"loss": 0.2}
        assert mgr.metrics(400) == {"loss": 0.25, "ok": True}
        assert mgr.metadata(400) == {"run": "a"}
        path = mgr.path(300)
        assert os.path.basename(path).startswith("step-00000300.") and path.endswith(".tf")
        assert tensorfile.load(path)["tag"] == "s300"
        with tensorfile.open(mgr.path(400)) as f:
            assert f.metadata() == {"run": "a"}
            assert torch.equal(f.get("w"), torch.full((16,), 400.0))
        from tensorfile._convert import verify

        assert verify(path)["tensors"] == 1
        assert mgr.load()["step"] == 400
        assert mgr.load(200)["tag"] == "s200"
        record = json.loads((tmp_path / "run" / "step-00000200.json").read_text())
        assert record["format"] == "tensorfile-manager" and record["step"] == 200
        assert record["data"] == os.path.basename(mgr.path(200))
        with pytest.raises(FileNotFoundError, match="no committed checkpoint of step 7"):
            mgr.load(7)
        data = {os.path.basename(mgr.path(s)) for s in mgr.steps()}
    records = {f"step-{s:08d}.json" for s in (100, 200, 300, 400)}
    assert _names(tmp_path / "run") == {LOCK_NAME, *records, *data}


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_best needs metric"):
        tensorfile.CheckpointManager(tmp_path, keep_best=2)
    with pytest.raises(ValueError, match="mode must be"):
        tensorfile.CheckpointManager(tmp_path, mode="lowest")
    with pytest.raises(ValueError, match="keep_every must be None or an int >= 1"):
        tensorfile.CheckpointManager(tmp_path, keep_every=0)
    with pytest.raises(ValueError, match="format must be"):
        tensorfile.CheckpointManager(tmp_path, format="zip")
    with tensorfile.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="step must be >= 0"):
            mgr.save(-1, {})
        with pytest.raises(TypeError, match="step must be an int"):
            mgr.save(True, {})
        with pytest.raises(TypeError, match="metric 'm' is a list"):
            mgr.save(1, {}, metrics={"m": [1]})
        with pytest.raises(TypeError, match=r"key path 'bad'"):
            mgr.save(1, {"bad": object()})
        assert mgr.steps() == []
        assert not [n for n in os.listdir(tmp_path) if n != LOCK_NAME]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, incremental=False) as mgr:
        mgr.save(5, _obj(5), metrics={"v": 1})
        first = mgr.path(5)
        mgr.save(5, {**_obj(5), "tag": "again"}, metrics={"v": 2})
        assert mgr.steps() == [5] and mgr.metrics(5) == {"v": 2}
        assert mgr.path(5) != first and not os.path.exists(first)
        assert mgr.load(5)["tag"] == "again"
        assert sorted(_names(tmp_path)) == sorted(
            [LOCK_NAME, "step-00000005.json", os.path.basename(mgr.path(5))]
        )


def test_a_rewound_run_becomes_the_newest_and_the_abandoned_steps_age_out(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, _obj(step))
        assert mgr.steps() == [20, 30]
        mgr.save(15, _obj(15))  # resumed from an earlier step and saved again
        assert mgr.latest() == 15 and mgr.steps() == [15, 30]
        assert mgr.load()["step"] == 15
        mgr.save(25, _obj(25))
        assert mgr.steps() == [15, 25] and mgr.latest() == 25


def test_delete_removes_record_and_data(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _obj(step))
        data = mgr.path(3)
        mgr.delete(3)
        assert mgr.steps() == [1, 2] and mgr.latest() == 2 and not os.path.exists(data)
        with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
            mgr.delete(3)


# --------------------------------------------------------------------------- retention


def _reference(
    saved: list[tuple[int, int, float | None]],
    keep_last: int | None,
    keep_every: int | None,
    keep_best: int | None,
    mode: str,
) -> set[int]:
    """The retention rule as the docs state it, checkpoint by checkpoint: kept if fewer
    than keep_last are more recent, or its step is a multiple of keep_every, or fewer than
    keep_best candidates are better (a better value, or the same value and more recent),
    or it is the most recent; everything when no rule is set."""
    if keep_last is None and keep_every is None and keep_best is None:
        return {s for s, _, _ in saved}

    def better(a: tuple[int, int, float | None], b: tuple[int, int, float | None]) -> bool:
        assert a[2] is not None and b[2] is not None
        if a[2] != b[2]:
            return a[2] < b[2] if mode == "min" else a[2] > b[2]
        return a[1] > b[1]

    keep = set()
    newest = max(q for _, q, _ in saved) if saved else None
    for c in saved:
        step, seq, value = c
        newer = sum(1 for _, q, _ in saved if q > seq)
        if seq == newest or (keep_last is not None and newer < keep_last):
            keep.add(step)
        if keep_every is not None and step % keep_every == 0:
            keep.add(step)
        if keep_best is not None and value is not None and value == value:
            ahead = sum(1 for o in saved if o[2] is not None and o[2] == o[2] and better(o, c))
            if ahead < keep_best:
                keep.add(step)
    return keep


_rules = st.fixed_dictionaries(
    {
        "keep_last": st.one_of(st.none(), st.integers(0, 3)),
        "keep_every": st.one_of(st.none(), st.integers(1, 5)),
        "keep_best": st.one_of(st.none(), st.integers(0, 3)),
        "mode": st.sampled_from(["min", "max"]),
    }
)
_metric = st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, float("nan")]), st.integers(0, 3))


@settings(max_examples=200, deadline=None)
@given(
    _rules,
    st.lists(st.tuples(st.integers(0, 30), st.integers(1, 50), _metric), max_size=12),
)
def test_retained_matches_the_reference(rules: dict[str, Any], rows: list[Any]) -> None:
    # One row per step (a step saved twice keeps its last record), distinct sequences.
    by_step = {}
    for i, (step, _, value) in enumerate(rows):
        by_step[step] = (step, i + 1, None if value is None else float(value))
    saved = list(by_step.values())
    assert retained(saved, **rules) == _reference(saved, **rules)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(0, 12), _metric),
        st.tuples(st.just("delete"), st.integers(0, 12), st.none()),
        st.tuples(st.just("reopen"), st.just(0), st.none()),
    ),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_rules, _ops)
def test_retention_over_random_save_delete_sequences(
    tmp_path_factory: Any, rules: dict[str, Any], ops: list[Any]
) -> None:
    directory = tmp_path_factory.mktemp("run")
    kwargs = dict(rules, metric="m" if rules["keep_best"] is not None else None, durable=False)
    mgr = tensorfile.CheckpointManager(directory, **kwargs)
    model: dict[int, tuple[int, int, float | None]] = {}
    metrics: dict[int, dict[str, Any]] = {}
    seq = 0
    try:
        for op, step, value in ops:
            if op == "save":
                m = {} if value is None else {"m": value}
                mgr.save(step, {"step": step}, metrics=m)
                seq += 1
                model[step] = (step, seq, None if value is None else float(value))
                metrics[step] = m
                keep = _reference(list(model.values()), **rules)
                model = {s: row for s, row in model.items() if s in keep}
            elif op == "delete":
                if step in model:
                    mgr.delete(step)
                    del model[step]
                else:
                    with pytest.raises(FileNotFoundError):
                        mgr.delete(step)
            else:
                mgr.close()
                mgr = tensorfile.CheckpointManager(directory, **kwargs)
            assert mgr.steps() == sorted(model)
            newest = max(model.values(), key=lambda r: r[1])[0] if model else None
            assert mgr.latest() == newest
        for step in model:
            got = mgr.metrics(step)
            want = metrics[step]
            assert json.dumps(got) == json.dumps(want)
            assert mgr.load(step)["step"] == step
    finally:
        mgr.close()


def test_keep_best_keeps_the_lowest_loss_and_the_newest(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, keep_best=2, metric="loss") as mgr:
        for step, loss in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.1), (5, 0.8), (6, float("nan"))]:
            mgr.save(step, {"s": step}, metrics={"loss": loss})
        assert mgr.steps() == [2, 4, 6]
        mgr.save(7, {"s": 7})  # no metric: kept only as the newest
        assert mgr.steps() == [2, 4, 7]
    with tensorfile.CheckpointManager(tmp_path, keep_best=1, metric="loss", mode="max") as mgr:
        mgr.save(8, {"s": 8}, metrics={"loss": 0.2})
        assert mgr.steps() == [2, 8]  # 0.3 is the highest; 8 is the newest


# --------------------------------------------------------------------------- last good


def _three(tmp_path: Path) -> tensorfile.CheckpointManager:
    mgr = tensorfile.CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        mgr.save(step, _obj(step))
    return mgr


def test_load_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path: Path) -> None:
    with _three(tmp_path) as mgr:
        path = mgr.path(3)
        _flip_byte(path, _first_storage_offset(path))
        assert mgr.steps() == [1, 2, 3]  # the damage shows only when the bytes are read
        with pytest.warns(RuntimeWarning, match=r"step 3 .*checksum mismatch.*loaded step 2"):
            assert mgr.load()["step"] == 2
        with pytest.raises(tensorfile.ChecksumError, match="step-00000003"):
            mgr.load(3)
        assert mgr.load(3, verify=False)["step"] == 3


def test_load_skips_truncated_and_missing_data_and_damaged_records(tmp_path: Path) -> None:
    with _three(tmp_path) as mgr:
        p3, p2 = mgr.path(3), mgr.path(2)
        os.truncate(p3, os.path.getsize(p3) - 10)
        os.unlink(p2)
        assert mgr.steps() == [1] and mgr.latest() == 1
        with pytest.warns(RuntimeWarning) as caught:
            assert mgr.load()["step"] == 1
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2
        assert "step 3" in messages[0] and "commit recorded" in messages[0]
        assert "step 2" in messages[1] and "is missing" in messages[1]
        with pytest.raises(tensorfile.FormatError, match="step 3 is damaged or incomplete"):
            mgr.load(3)
        (tmp_path / "step-00000001.json").write_text("{not json")
        assert mgr.steps() == []
        with (
            pytest.raises(
                tensorfile.FormatError,
                match=r"no checkpoint loads \(3 damaged.*step 1: .*not valid JSON",
            ),
        ):
            mgr.load()


def test_a_damaged_record_newer_than_the_loaded_step_is_reported(tmp_path: Path) -> None:
    with _three(tmp_path) as mgr:
        (tmp_path / "step-00000003.json").write_text("[]")
        with pytest.warns(
            RuntimeWarning, match="step 3 .*not a tensorfile checkpoint manager record"
        ):
            assert mgr.load()["step"] == 2


def test_load_with_nothing_committed(tmp_path: Path) -> None:
    with (
        tensorfile.CheckpointManager(tmp_path) as mgr,
        pytest.raises(FileNotFoundError, match="no committed checkpoint to load"),
    ):
        mgr.load()


# --------------------------------------------------------------------------- resume


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _net(seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _train(model: Any, opt: Any, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _state_bytes(model: Any, opt: Any) -> list[bytes]:
    out = [p.detach().numpy().tobytes() for p in model.parameters()]
    for s in opt.state_dict()["state"].values():
        out += [v.numpy().tobytes() for v in s.values()]
    return out


@pytest.mark.parametrize("optimizer_in_place", [False, True])
def test_three_step_resume_in_place_is_bit_identical(
    tmp_path: Path, optimizer_in_place: bool
) -> None:
    ref_model, ref_opt = _net(0)
    _train(ref_model, ref_opt, range(6))

    model, opt = _net(0)
    with tensorfile.CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in range(3):
            _train(model, opt, range(step, step + 1))
            mgr.save(
                step + 1, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1}
            )
        assert mgr.steps() == [2, 3]

    # A new process would start from a fresh model; seed 1 makes every value differ.
    model2, opt2 = _net(1)
    into: dict[str, Any] = {"model": model2.state_dict()}
    if optimizer_in_place:
        _train(model2, opt2, range(99, 100))  # the optimizer's state tensors now exist
        into["optim"] = opt2.state_dict()
    ptrs = {k: t.data_ptr() for k, t in into["model"].items()}
    opt_ptrs = [v.data_ptr() for s in opt2.state.values() for v in s.values()]
    with tensorfile.CheckpointManager(tmp_path, keep_last=2) as mgr:
        ckpt = mgr.load(into=into)
    assert ckpt["step"] == 3
    for k, t in into["model"].items():
        assert ckpt["model"][k] is t and t.data_ptr() == ptrs[k]
    opt2.load_state_dict(ckpt["optim"])
    if optimizer_in_place:
        assert [v.data_ptr() for s in opt2.state.values() for v in s.values()] == opt_ptrs
    _train(model2, opt2, range(3, 6))
    assert _state_bytes(model2, opt2) == _state_bytes(ref_model, ref_opt)


# --------------------------------------------------------------------------- block=False


def test_block_false_snapshots_at_once_commits_in_order_and_reuses_one_buffer(
    tmp_path: Path,
) -> None:
    from tensorfile import _async

    tensorfile.release_async_buffers()
    big = torch.zeros(1 << 20)
    state = {"big": big, "small": torch.zeros(3)}
    before = _async._pool.allocations
    futures = []
    with tensorfile.CheckpointManager(tmp_path, keep_last=3) as mgr:
        for step in range(1, 9):
            big.fill_(step)
            state["small"].fill_(-step)
            futures.append(mgr.save(step, state, metrics={"step": step}, block=False))
            big.fill_(-1.0)  # the caller changes its tensors at once
            state["small"].fill_(99)
            # The previous save had to finish before this one was taken.
            assert all(f.done() for f in futures[:-1])
        mgr.wait()
        assert all(f.result() is None for f in futures)
        assert mgr.steps() == [6, 7, 8]
        records = [json.loads((tmp_path / f"step-{s:08d}.json").read_text()) for s in (6, 7, 8)]
        assert [r["sequence"] for r in records] == [6, 7, 8]
        for step in (6, 7, 8):
            got = mgr.load(step)
            assert bool(got["big"].eq(step).all()) and bool(got["small"].eq(-step).all())
    # One snapshot in flight at a time: the pool's buffer is reused, memory does not grow.
    assert _async._pool.allocations - before == 1


def test_block_false_error_is_raised_by_the_future_and_once_by_wait(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from tensorfile import _manager

    with tensorfile.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _obj(1))

        def broken(self: Any) -> bytes:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(_manager.Record, "to_json", broken)
        fut = mgr.save(2, _obj(2), block=False)
        assert fut is not None
        with pytest.raises(OSError, match="No space left"):
            fut.result()
        with pytest.raises(OSError, match="No space left"):
            mgr.wait()
        mgr.wait()  # reported once
        monkeypatch.undo()
        assert mgr.steps() == [1]
        # The data of the failed commit is gone.
        assert sorted(_names(tmp_path)) == sorted(
            [LOCK_NAME, "step-00000001.json", os.path.basename(mgr.path(1))]
        )
        mgr.save(3, _obj(3), block=False)
    assert tensorfile.CheckpointManager(tmp_path, read_only=True).steps() == [1, 3]


def test_block_false_error_is_raised_by_the_next_save(tmp_path: Path, monkeypatch: Any) -> None:
    from tensorfile import _manager

    with tensorfile.CheckpointManager(tmp_path) as mgr:
        monkeypatch.setattr(_manager.Record, "to_json", lambda self: 1 / 0)
        fut = mgr.save(1, _obj(1), block=False)
        assert fut is not None and isinstance(fut.exception(), ZeroDivisionError)
        monkeypatch.undo()
        with pytest.raises(ZeroDivisionError):
            mgr.save(2, _obj(2))
        mgr.save(2, _obj(2))
        assert mgr.steps() == [2]


# --------------------------------------------------------------------------- the lock


def test_one_writing_manager_per_directory_in_this_process(tmp_path: Path) -> None:
    mgr = tensorfile.CheckpointManager(tmp_path)
    mgr.save(1, _obj(1))
    with pytest.raises(BlockingIOError, match=f"in use by another manager \\(pid {os.getpid()} on"):
        tensorfile.CheckpointManager(tmp_path)
    reader = tensorfile.CheckpointManager(tmp_path, read_only=True)
    assert reader.steps() == [1] and reader.load()["step"] == 1
    with pytest.raises(RuntimeError, match="read_only"):
        reader.save(2, _obj(2))
    mgr.close()
    with tensorfile.CheckpointManager(tmp_path) as again:
        assert again.steps() == [1]


def test_a_manager_in_another_process_is_refused_until_it_dies(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, WORKER, "hold", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        with pytest.raises(BlockingIOError, match=f"pid {child.pid} on"):
            tensorfile.CheckpointManager(tmp_path)
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    with tensorfile.CheckpointManager(tmp_path) as mgr:  # the lock died with its holder
        mgr.save(1, _obj(1))


# --------------------------------------------------------------------------- leftovers


def test_a_new_manager_removes_what_killed_saves_left(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _obj(1))
        mgr.save(2, _obj(2))
    kept = _names(tmp_path)
    orphan = tmp_path / "step-00000003.0123abcd.tf"  # data whose record was never written
    tensorfile.save(_obj(3), orphan)
    replaced = tmp_path / "step-00000002.89abcdef.tf"  # data of a replaced checkpoint
    replaced.write_bytes(b"old")
    stale_dir = tmp_path / "step-00000004.00ff00ff.dcp"
    stale_dir.mkdir()
    (stale_dir / "__0_0000.tf").write_bytes(b"x")
    dead_tmp = tmp_path / f".step-00000005.json.{tensorfile._files._host()}.{2**40}.0a0b0c0d.tftmp"
    dead_tmp.write_bytes(b"{")
    # Not ours: names the manager never makes, and data of a step whose record is unreadable.
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "step-6.tf").write_text("keep")
    (tmp_path / "step-00000007.json").write_text("damaged")
    (tmp_path / "step-00000007.0badf00d.tf").write_text("keep")
    with tensorfile.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [1, 2]
    assert _names(tmp_path) == kept | {
        "notes.txt",
        "step-6.tf",
        "step-00000007.json",
        "step-00000007.0badf00d.tf",
    }


def _read_log(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def ctx() -> Any:
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(
        # Light, so that the kill tests' children start at once; the DCP ranks import
        # torch themselves (unless tests/test_dcp.py started the server first).
        ["tensorfile", "_manager_worker"]
    )
    return c


def _run_loop(
    ctx: Any, directory: Path, first: int, count: int, die_at: int, delay: float, log: Path
) -> int | None:
    """Runs worker.loop in a child; returns its exit code (0, or -9 when it killed itself)."""
    log.unlink(missing_ok=True)
    proc = ctx.Process(
        target=worker.loop, args=(str(directory), first, count, die_at, delay, str(log))
    )
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode in (0, -9), proc.exitcode
    return proc.exitcode


def _check_after_kill(directory: Path, history: list[int], log: list[str]) -> None:
    """Opens a new manager on a directory whose writer was killed and checks it; extends
    `history` (the steps committed so far, in order) with what the child committed."""
    current = None
    in_flight = None
    may_have_committed = False
    for line in log:
        if line.startswith("begin "):
            current = int(line.split()[1])
            in_flight, may_have_committed = current, False
        elif line == "manager:committed":
            assert current is not None
            history.append(current)
            in_flight = None
        elif line == "manager:record":
            may_have_committed = True  # its record's rename may have happened
    with tensorfile.CheckpointManager(directory, keep_last=worker.KEEP_LAST) as mgr:
        steps = mgr.steps()
        latest = mgr.latest()
        if in_flight is not None and latest == in_flight:
            assert may_have_committed, log[-8:]
            history.append(in_flight)
        # The newest is the last save that committed, whole, and the one before it is
        # still there: retention may be cut short, never run ahead. Nothing uncommitted
        # is listed.
        assert latest == history[-1], (latest, history, log[-8:])
        assert set(history[-worker.KEEP_LAST :]) <= set(steps) <= set(history), (steps, history)
        for step in steps:
            worker.check_payload(mgr.load(step), step)
        # Only records, their data and the lock are left.
        names = _names(directory)
        want = {LOCK_NAME} | {f"step-{s:08d}.json" for s in steps}
        want |= {os.path.basename(mgr.path(s)) for s in steps}
        want |= {held for s in steps for held in _holders(directory, s)}
        assert names == want, (sorted(names - want), sorted(want - names))


def _holders(directory: Path, step: int) -> set[str]:
    """The data files an incremental checkpoint's storages are read from."""
    doc = json.loads((directory / f"step-{step:08d}.json").read_text())
    return {row[1] for row in doc.get("storages") or ()}


def _kill_trials(ctx: Any, tmp_path: Path, moments: list[tuple[int, float]]) -> list[int]:
    """Runs one child per moment (die at the moment's phase of its second save, after its
    delay) on one directory; returns the children's exit codes."""
    directory = tmp_path / "run"
    log = tmp_path / "log"
    assert _run_loop(ctx, directory, 1, 2, 0, 0, log) == 0
    history = [1, 2]
    codes = []
    for die_at, delay in moments:
        codes.append(_run_loop(ctx, directory, history[-1] + 1, 2, die_at, delay, log))
        _check_after_kill(directory, history, _read_log(log))
    # And the run goes on: the next save prunes what a killed retention left.
    assert _run_loop(ctx, directory, history[-1] + 1, 1, 0, 0, log) == 0
    with tensorfile.CheckpointManager(directory, read_only=True) as mgr:
        assert mgr.steps() == [history[-1], history[-1] + 1]
    return codes


def _phases_of_one_save(ctx: Any, tmp_path: Path) -> list[str]:
    directory = tmp_path / "calibrate"
    log = tmp_path / "calibrate.log"
    assert _run_loop(ctx, directory, 1, 3, 0, 0, log) == 0
    lines = _read_log(log)
    return lines[lines.index("begin 3") + 1 :]


def _check_phases(phases: list[str]) -> None:
    # One save: its data file, its record, then retention removing the oldest of three.
    assert phases[0] == "manager:data" and phases[-3:] == [
        "manager:retention",
        "manager:uncommitted",
        "manager:removed",
    ]
    assert phases[phases.index("manager:record") :].count("rename") == 1


def test_kill_at_the_moments_that_matter(ctx: Any, tmp_path: Path) -> None:
    phases = _phases_of_one_save(ctx, tmp_path)
    _check_phases(phases)
    record = phases.index("manager:record")
    moments = [
        phases.index("writing") + 1,  # data half written (killed at the next phase)
        phases.index("rename") + 1,  # data renamed into place, no record yet
        record + phases[record:].index("rename") + 1,  # record renamed: committed
        phases.index("manager:uncommitted") + 1,  # retention: record gone, data not yet
    ]
    codes = _kill_trials(ctx, tmp_path, [(k, 0.0) for k in moments])
    assert codes == [-9] * len(moments)


@pytest.mark.slow
def test_kill_at_each_phase_and_at_random_moments(ctx: Any, tmp_path: Path) -> None:
    phases = _phases_of_one_save(ctx, tmp_path)
    _check_phases(phases)
    rng = random.Random(16)
    moments = [(k, 0.0) for k in range(1, len(phases) + 1)]
    moments += [
        (rng.randrange(1, len(phases) + 1), rng.choice([0.001, 0.004, 0.02])) for _ in range(20)
    ]
    _kill_trials(ctx, tmp_path, moments)


# --------------------------------------------------------------------------- format="dcp"


single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _dcp_state(version: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(version)
    return {
        "model": {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g)},
        "step": version,
    }


def test_dcp_format_in_one_process(tmp_path: Path) -> None:
    import tensorfile.dcp as tdcp

    with tensorfile.CheckpointManager(tmp_path, format="dcp", keep_last=2) as mgr:
        for v in (1, 2, 3):
            mgr.save(v, _dcp_state(v), metrics={"v": v})
        assert mgr.steps() == [2, 3] and mgr.latest() == 3
        assert os.path.isdir(mgr.path(3)) and mgr.path(3).endswith(".dcp")
        dest = {"model": {"w": torch.zeros(64, 8), "b": torch.zeros(8)}, "step": 0}
        w = dest["model"]["w"]
        out = mgr.load(into=dest)
        assert out is dest and dest["model"]["w"] is w and dest["step"] == 3
        assert torch.equal(w, _dcp_state(3)["model"]["w"])
        full = mgr.load(2)
        assert torch.equal(full["model"]["b"], _dcp_state(2)["model"]["b"]) and full["step"] == 2
        assert tdcp.dcp_to_state_dict(mgr.path(3))["step"] == 3
        worker.damage_rank_file(mgr.path(3), 0)
        with pytest.warns(RuntimeWarning, match="step 3 .*checksum"):
            mgr.load(into=dest)
        assert dest["step"] == 2 and torch.equal(w, _dcp_state(2)["model"]["w"])
        with pytest.raises(ValueError, match="block=True"):
            mgr.save(4, _dcp_state(4), block=False)
        with pytest.raises(ValueError, match="map_location"):
            mgr.load(map_location="cpu", into=dest)
    with pytest.raises(tensorfile.FormatError, match="format='dcp'"):
        tensorfile.CheckpointManager(tmp_path)


@pytest.mark.slow
def test_dcp_format_with_two_gloo_ranks_and_a_resharded_load(ctx: Any, tmp_path: Path) -> None:
    import _dcp_worker

    procs = [
        ctx.Process(target=worker.run_dcp, args=("retain", r, 2, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
    assert codes == [0, 0], f"exit codes {codes}\n{errors}"
    # One process reads what two ranks wrote: DCP reshards the DTensor shards.
    with tensorfile.CheckpointManager(tmp_path / "run", format="dcp", read_only=True) as mgr:
        assert mgr.steps() == [2, 4]
        want = _dcp_worker.full_state(4)
        dest = {
            "model": {k: torch.zeros_like(t) for k, t in want["model"].items()},
            "step": 0,
            "extra": {},
        }
        out = mgr.load(4, into=dest)
        for k, t in want["model"].items():
            assert torch.equal(out["model"][k], t), k
        assert out["step"] == want["step"]
