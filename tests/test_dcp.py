"""tensorfile.dcp: the torch.distributed.checkpoint storage plugin.

Multi-process tests run 1, 2 and 4 gloo ranks on the CPU (tests/_dcp_worker.py, started
from a forkserver that imports torch once); the others drive the plugin in this process.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import _dcp_worker
import numpy as np
import pytest
import tensorfile
import tensorfile.dcp as tdcp
import torch
import torch.distributed.checkpoint as dcp
from tensorfile import _engine
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ctx() -> Any:
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(
        [
            "torch",
            "torch.distributed.checkpoint",
            "torch.distributed.tensor",
            "tensorfile.dcp",
            "_dcp_worker",
        ]
    )
    return c


def _launch(ctx: Any, scenario: str, world: int, root: Path, timeout: float = 150) -> list[int]:
    """Runs `scenario` on `world` ranks; returns their exit codes (None: killed at timeout)."""
    procs = [
        ctx.Process(target=_dcp_worker.run, args=(scenario, r, world, str(root)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _errors(root: Path, scenario: str) -> str:
    return "\n".join(p.read_text() for p in sorted(root.glob(f"error-{scenario}-*.txt")))


def _assert_ok(ctx: Any, scenario: str, world: int, root: Path) -> None:
    codes = _launch(ctx, scenario, world, root)
    assert codes == [0] * world, f"{scenario}: exit codes {codes}\n{_errors(root, scenario)}"


def _assert_full(got: dict[str, Any], version: int) -> None:
    want = _dcp_worker.full_state(version)
    assert set(got["model"]) == set(want["model"])
    for k, t in want["model"].items():
        assert got["model"][k].dtype == t.dtype
        assert torch.equal(got["model"][k], t), k
    assert got["step"] == want["step"]
    assert got["extra"] == want["extra"]


@pytest.fixture(scope="module")
def saved(ctx: Any, tmp_path_factory: Any) -> Path:
    """Checkpoints written by 4 ranks: A (plugin, version 1), S (stock FileSystemWriter,
    version 1) and B (plugin through dcp.async_save, version 2, mutated after the call)."""
    root = tmp_path_factory.mktemp("dcp")
    _assert_ok(ctx, "save4", 4, root)
    return root


# --------------------------------------------------------------------------- multi-process


def test_four_ranks_write_one_file_each_and_json_metadata(saved: Path) -> None:
    names = sorted(os.listdir(saved / "A"))
    assert names[-1] == tdcp.METADATA_NAME
    ranks = sorted(int(n.split("_")[2]) for n in names[:-1])
    assert ranks == [0, 1, 2, 3]
    doc = json.loads((saved / "A" / tdcp.METADATA_NAME).read_bytes())
    assert doc["format"] == "tensorfile-dcp"
    assert {name for name, _ in doc["files"]} == set(names[:-1])
    # Every rank file is a plain tensorfile, checksummed, readable on its own.
    for n in names[:-1]:
        with tensorfile.open(saved / "A" / n) as f:
            assert len(f.keys()) > 0
    sd = doc["storage_data"]
    big = [j for j, fqn in enumerate(sd["fqn"]) if fqn == "model.big"]
    assert len(big) == 4 and all(len(sd["block_crcs"][str(j)]) == 3 for j in big)


def test_async_save_snapshot_and_4_rank_roundtrip(saved: Path) -> None:
    # The workers checked their own loads; this checks B from outside, in one process.
    _assert_full(tdcp.dcp_to_state_dict(saved / "B"), 2)


def test_reshard_4_to_2_ranks(ctx: Any, saved: Path) -> None:
    _assert_ok(ctx, "load2", 2, saved)


def test_reshard_4_to_1_rank(ctx: Any, saved: Path) -> None:
    _assert_ok(ctx, "load1", 1, saved)


@single_process
def test_convert_reads_both_writers(saved: Path) -> None:
    _assert_full(tdcp.dcp_to_state_dict(saved / "A"), 1)
    _assert_full(tdcp.dcp_to_state_dict(saved / "S"), 1)
    flat = tdcp.dcp_to_state_dict(saved / "S", nested=False)
    assert torch.equal(flat["model.big"], _dcp_worker.full_state(1)["model"]["big"])


@single_process
def test_rank_killed_mid_save(ctx: Any, saved: Path) -> None:
    codes = _launch(ctx, "kill", 2, saved, timeout=60)
    assert codes[1] == -9, codes  # rank 1 died by SIGKILL in the middle of its write
    assert codes[0] != 0, codes  # rank 0 saw the save fail (or hung and was killed)
    with pytest.raises(tdcp.IncompleteCheckpointError, match=r"incomplete.*did not commit"):
        tdcp.StorageReader(saved / "C").read_metadata()
    with pytest.raises(CheckpointException, match="incomplete"):
        dcp.load({"step": 0}, storage_reader=tdcp.StorageReader(saved / "C"), no_dist=True)
    # The previous checkpoint, in its own directory, is untouched.
    _assert_full(tdcp.dcp_to_state_dict(saved / "A"), 1)
    # Both writers are gone: `tensorfile clean` removes what the dead save wrote (rank
    # 0's whole file, rank 1's temporary file), and leaves A alone.
    left = [n for n in os.listdir(saved / "C") if n.endswith((".tf", ".tftmp"))]
    assert any(n.endswith(".tf") for n in left), left
    from click.testing import CliRunner
    from tensorfile.cli import main as cli

    r = CliRunner().invoke(cli, ["clean", str(saved / "C")])
    assert r.exit_code == 0, r.output
    assert not [n for n in os.listdir(saved / "C") if n.endswith((".tf", ".tftmp", ".lock"))]
    _assert_full(tdcp.dcp_to_state_dict(saved / "A"), 1)


# --------------------------------------------------------------------------- single process


def _sample() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "model": {
            "w": torch.randn(33, 7),
            "t": base.t(),  # not contiguous
            "bf": torch.randn(5, dtype=torch.bfloat16),
            "flags": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
        },
        "opt": {"step": 7, "groups": [{"lr": 0.1, "name": "a"}], "blob": b"\x00\x01raw"},
    }


def _zeros_like(sd: Any) -> Any:
    if isinstance(sd, dict):
        return {k: _zeros_like(v) for k, v in sd.items()}
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    return None


def _assert_equal_tree(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_equal_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    else:
        assert a == b


@single_process
def test_single_process_roundtrip(tmp_path: Path) -> None:
    sd = _sample()
    tdcp.state_dict_to_dcp(sd, tmp_path / "ck")
    dest = _zeros_like(sd)
    dest["opt"] = {"step": 0, "groups": [{"lr": 0.0, "name": ""}], "blob": b""}
    dcp.load(dest, storage_reader=tdcp.StorageReader(tmp_path / "ck"), no_dist=True)
    _assert_equal_tree(sd, dest)
    _assert_equal_tree(sd, tdcp.dcp_to_state_dict(tmp_path / "ck"))
    flat = tdcp.dcp_to_state_dict(tmp_path / "ck", nested=False)
    assert torch.equal(flat["model.w"], sd["model"]["w"]) and flat["opt.step"] == 7


@single_process
def test_dcp_save_and_load_with_stock_api(tmp_path: Path) -> None:
    sd = {"a": torch.randn(10, 10), "n": 3}
    dcp.save(sd, storage_writer=tdcp.StorageWriter(tmp_path / "x", num_threads=2), no_dist=True)
    out = {"a": torch.zeros(10, 10), "n": 0}
    dcp.load(out, storage_reader=tdcp.StorageReader(tmp_path / "x", num_threads=1), no_dist=True)
    assert torch.equal(out["a"], sd["a"]) and out["n"] == 3


def test_metadata_is_json_not_pickle(tmp_path: Path) -> None:
    tdcp.state_dict_to_dcp(_sample(), tmp_path / "ck")
    blob = (tmp_path / "ck" / tdcp.METADATA_NAME).read_bytes()
    doc = json.loads(blob)
    assert doc["storage_meta"]["checkpoint_id"] == str(tmp_path / "ck")
    md = tdcp.StorageReader(tmp_path / "ck").read_metadata()
    assert md.planner_data["model.w"] == ("model", "w")  # tuples survive the JSON
    assert md.state_dict_metadata["model.bf"].properties.dtype == torch.bfloat16
    assert md.version == "1.0.0" and md.storage_meta.load_id


class _Collect:
    """A minimal LoadPlanner: destination tensors given up front, commits recorded."""

    def __init__(self, dests: dict[str, torch.Tensor]) -> None:
        self.dests = dests
        self.committed: list[str] = []
        self.bytes: dict[str, bytes] = {}

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dests[req.dest_index.fqn]

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(req.dest_index.fqn)

    def load_bytes(self, req: ReadItem, value: io.BytesIO) -> None:
        self.bytes[req.dest_index.fqn] = value.read()


def _slice_plan(fqn: str, shape: list[int], start: list[int], lengths: list[int]) -> LoadPlan:
    return LoadPlan(
        [
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn),
                dest_offsets=torch.Size([0] * len(shape)),
                storage_index=MetadataIndex(fqn, [0] * len(shape)),
                storage_offsets=torch.Size(start),
                lengths=torch.Size(lengths),
            )
        ]
    )


@pytest.fixture
def big_ckpt(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    big = torch.randn(2048, 1024)  # 8 MiB: one chunk, eight checksum blocks
    tdcp.state_dict_to_dcp({"big": big}, tmp_path / "ck")
    return tmp_path / "ck", big


def _read_slice(
    path: Path, start: list[int], lengths: list[int], monkeypatch: Any
) -> tuple[torch.Tensor, int]:
    read: list[int] = []
    real = _engine.read_regions

    def counting(**kwargs: Any) -> Any:
        read.append(int(np.asarray(kwargs["nbytes"], dtype=np.uint64).sum()))
        return real(**kwargs)

    monkeypatch.setattr(_engine, "read_regions", counting)
    reader = tdcp.StorageReader(path)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    dest = torch.zeros(lengths)
    planner = _Collect({"big": dest})
    reader.read_data(_slice_plan("big", [2048, 1024], start, lengths), planner).wait()  # type: ignore[arg-type]
    assert planner.committed == ["big"]
    return dest, sum(read)


def test_resharded_read_reads_only_the_slice(big_ckpt: Any, monkeypatch: Any) -> None:
    path, big = big_ckpt
    # Rows 300..900 of a row-major chunk: one contiguous byte range of 2.3 MiB.
    got, nread = _read_slice(path, [300, 0], [600, 1024], monkeypatch)
    assert torch.equal(got, big[300:900])
    want = 600 * 1024 * 4
    assert want <= nread <= want + 2 * (1 << 20), nread  # at most the two edge blocks more
    # A column slice is strided in the file: the covering rows are read, then narrowed.
    got, nread = _read_slice(path, [100, 512], [50, 256], monkeypatch)
    assert torch.equal(got, big[100:150, 512:768])
    assert nread <= 50 * 1024 * 4 + 2 * (1 << 20), nread


def test_resharded_read_checks_the_blocks_it_reads(big_ckpt: Any, monkeypatch: Any) -> None:
    path, big = big_ckpt
    (name,) = [n for n in os.listdir(path) if n.endswith(".tf")]
    with tensorfile.open(path / name) as f:
        data_start = int(f._reader.layout.storage_offsets[0])
    with open(path / name, "r+b") as fh:  # damage a byte of row 1800, far from the slice
        fh.seek(data_start + 1800 * 4096 + 5)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x40]))
    got, _ = _read_slice(path, [300, 0], [600, 1024], monkeypatch)
    assert torch.equal(got, big[300:900])
    with pytest.raises(tensorfile.ChecksumError, match="'big@0,0' checksum mismatch"):
        _read_slice(path, [1500, 0], [400, 1024], monkeypatch)


@single_process
def test_corrupted_shard_file_is_detected(tmp_path: Path) -> None:
    sd = {"w": torch.randn(100, 100), "v": torch.randn(10)}
    tdcp.state_dict_to_dcp(sd, tmp_path / "ck")
    (name,) = [n for n in os.listdir(tmp_path / "ck") if n.endswith(".tf")]
    p = tmp_path / "ck" / name
    with tensorfile.open(p) as f:
        at = int(f._reader.layout.storage_offsets[0]) + 1000
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0x01  # inside the first storage's bytes
    p.write_bytes(bytes(raw))
    out = {"w": torch.zeros(100, 100), "v": torch.zeros(10)}
    with pytest.raises(CheckpointException, match="checksum mismatch") as info:
        dcp.load(out, storage_reader=tdcp.StorageReader(tmp_path / "ck"), no_dist=True)
    assert name in str(info.value)
    # verify=False reads it anyway (structure still checked).
    dcp.load(out, storage_reader=tdcp.StorageReader(tmp_path / "ck", verify=False), no_dist=True)


def test_incomplete_and_damaged_directories_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        tdcp.StorageReader(tmp_path / "nope").read_metadata()
    (tmp_path / "empty").mkdir()
    with pytest.raises(tdcp.IncompleteCheckpointError, match="no checkpoint here"):
        tdcp.StorageReader(tmp_path / "empty").read_metadata()
    tdcp.state_dict_to_dcp({"w": torch.randn(64)}, tmp_path / "ck")
    (name,) = [n for n in os.listdir(tmp_path / "ck") if n.endswith(".tf")]
    shutil.copytree(tmp_path / "ck", tmp_path / "uncommitted")
    (tmp_path / "uncommitted" / tdcp.METADATA_NAME).unlink()
    with pytest.raises(tdcp.IncompleteCheckpointError, match=r"did not commit.*1 rank file"):
        tdcp.StorageReader(tmp_path / "uncommitted").read_metadata()
    shutil.copytree(tmp_path / "ck", tmp_path / "truncated")
    with open(tmp_path / "truncated" / name, "r+b") as f:
        f.truncate(100)
    with pytest.raises(tdcp.IncompleteCheckpointError, match=f"{name} holds 100 bytes"):
        tdcp.StorageReader(tmp_path / "truncated").read_metadata()
    (tmp_path / "ck" / name).unlink()
    with pytest.raises(tdcp.IncompleteCheckpointError, match=f"{name} is missing"):
        tdcp.StorageReader(tmp_path / "ck").read_metadata()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format_version=99), "version 99 is not supported"),
        (lambda d: d["properties"][0].__setitem__(0, "system"), "dtype 'system'"),
        (lambda d: d["state_dict_metadata"]["w"].__setitem__(2, [[[60], [10]]]), "outside"),
        (lambda d: d["storage_data"]["file"].__setitem__(0, 7), "storage entry 0"),
        (lambda d: d["files"][0].__setitem__(0, "../../etc/passwd"), "files"),
        (lambda d: d.update(planner_data={"bogus": 1}), "planner_data"),
        (lambda d: d.update(planner_data={"value": {"bogus": 1}}), "unknown tag"),
        (lambda d: d.pop("files"), "KeyError"),
    ],
)
def test_hostile_metadata_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    tdcp.state_dict_to_dcp({"w": torch.randn(64)}, tmp_path / "ck")
    p = tmp_path / "ck" / tdcp.METADATA_NAME
    doc = json.loads(p.read_bytes())
    edit(doc)
    p.write_text(json.dumps(doc))
    with pytest.raises(tensorfile.FormatError, match=message) as info:
        tdcp.StorageReader(tmp_path / "ck").read_metadata()
    assert str(p) in str(info.value)


def test_damaged_json_is_refused(tmp_path: Path) -> None:
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, tmp_path / "ck")
    p = tmp_path / "ck" / tdcp.METADATA_NAME
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(tensorfile.FormatError, match="not valid JSON"):
        tdcp.StorageReader(tmp_path / "ck").read_metadata()


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


@single_process
def test_stock_metadata_is_unpickled_with_an_allow_list(tmp_path: Path) -> None:
    w = torch.randn(4)
    dcp.save({"w": w}, storage_writer=dcp.FileSystemWriter(tmp_path / "s"), no_dist=True)
    assert torch.equal(tdcp.dcp_to_state_dict(tmp_path / "s")["w"], w)
    (tmp_path / "s" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(tensorfile.FormatError, match=r"refusing posix\.system"):
        tdcp.dcp_to_state_dict(tmp_path / "s")


@single_process
def test_same_directory_crash_keeps_the_old_checkpoint(ctx: Any, tmp_path: Path) -> None:
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp(_dcp_worker.full_state(4), d)
    p = ctx.Process(target=_dcp_worker.crash_overwrite, args=(str(d), 5))
    p.start()
    p.join(120)
    assert p.exitcode == -9
    _assert_full(tdcp.dcp_to_state_dict(d), 4)  # still the old one, whole
    tdcp.state_dict_to_dcp(_dcp_worker.full_state(6), d)
    _assert_full(tdcp.dcp_to_state_dict(d), 6)
    # The commit removed the replaced rank file and the dead writer's leftovers.
    assert len([n for n in os.listdir(d) if n.endswith(".tf")]) == 1
    assert not [n for n in os.listdir(d) if n.endswith(".tftmp")]


@single_process
def test_overwrite_false_refuses_a_committed_directory(tmp_path: Path) -> None:
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, tmp_path / "ck")
    with pytest.raises(CheckpointException, match="already holds a checkpoint"):
        tdcp.state_dict_to_dcp({"w": torch.randn(4)}, tmp_path / "ck", overwrite=False)


def test_plugin_interface(tmp_path: Path) -> None:
    assert tdcp.StorageWriter.validate_checkpoint_id(tmp_path / "x")
    assert tdcp.StorageReader.validate_checkpoint_id(str(tmp_path))
    assert not tdcp.StorageWriter.validate_checkpoint_id("s3://bucket/ckpt")
    assert not tdcp.StorageReader.validate_checkpoint_id(42)  # type: ignore[arg-type]
    w = tdcp.StorageWriter(tmp_path / "a", sync_files=False, thread_count=2)
    assert w.durable is False and w.num_threads == 2
    w.reset(tmp_path / "b", "extra-positional", future_kwarg=1)
    w.set_up_storage_writer(True, "extra", rank=0, use_collectives=True, future_kwarg=1)
    meta = w.storage_meta()
    assert meta is not None and meta.checkpoint_id == str(tmp_path / "b") and meta.save_id
    r = tdcp.StorageReader(tmp_path / "b")
    r.reset(tmp_path / "c", future_kwarg=1)
    assert r.checkpoint_id == str(tmp_path / "c")
    with pytest.raises(TypeError):
        tdcp.StorageWriter(tmp_path, bogus=1)  # type: ignore[call-arg]


def test_bench_dcp_smoke(ctx: Any, tmp_path: Path) -> None:
    from tensorfile.benchmarks import dcp as _bench_dcp

    out = tmp_path / "bench.json"
    args = ["--size", "2M", "--small-count", "50", "--small-size", "200K", "--reps", "1"]
    assert _bench_dcp.main([*args, "--dir", str(tmp_path), "--json", str(out)], ctx=ctx) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {
        f"{w}/{s}" for w in ("large", "small") for s in ("tensorfile", "stock")
    }
    for r in report["results"].values():
        assert len(r["save_s"]) == 1 and r["save_median_s"] > 0 and r["load_median_s"] > 0
    assert report["ratios"]["large"]["save_ratio"] > 0
    with pytest.raises(SystemExit):
        _bench_dcp.main(["--workloads", "huge"])
    assert _bench_dcp.parse_size("1G") == 1 << 30 and _bench_dcp.parse_size("64MiB") == 64 << 20


@single_process
def test_per_rank_commit_without_collectives(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    w = tdcp.StorageWriter(d)
    dcp.save(
        {"a": torch.arange(5.0), "n": 4}, storage_writer=w, no_dist=True, use_collectives=False
    )
    assert f"__0_{tdcp.METADATA_NAME}" in os.listdir(d)
    out = {"a": torch.zeros(5), "n": 0}
    dcp.load(
        out, storage_reader=tdcp.StorageReader(d), no_dist=True
    )  # falls back to rank 0's record
    assert torch.equal(out["a"], torch.arange(5.0)) and out["n"] == 4
    dcp.save(
        {"a": torch.ones(5), "n": 5},
        storage_writer=tdcp.StorageWriter(d),
        no_dist=True,
        use_collectives=False,
    )
    assert len([n for n in os.listdir(d) if n.endswith(".tf")]) == 1


@single_process
def test_a_stock_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    dcp.save(
        {"w": torch.randn(4)}, storage_writer=dcp.FileSystemWriter(tmp_path / "s"), no_dist=True
    )
    with pytest.raises(tensorfile.FormatError, match="written by torch's FileSystemWriter"):
        tdcp.StorageReader(tmp_path / "s").read_metadata()
