"""Incremental checkpoints: storage references (format 1.1) and the manager's use of them.

A storage whose bytes (XXH3-128 digest and size) equal one a committed checkpoint holds is
not written again; the new file refers to it. Every reader follows references only inside
the file's directory, and a data file stays until no committed checkpoint needs it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorfile import FormatError, _io
from tensorfile._runs import LOCK_NAME
from tensorfile._tree import no_gc
from tensorfile.cli import main as cli_main
from tensorfile.formats import native

FROZEN = 1 << 16  # elements of the frozen tensors


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "embed": torch.randn(FROZEN, generator=g),  # frozen
            "layer": torch.randn(FROZEN // 2, generator=g),  # frozen
            "head": torch.full((64,), float(step)),  # trained
        },
        "step": step,
    }


def _records(directory: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".json"):
            doc = json.loads((directory / name).read_text())
            out[doc["step"]] = doc
    return out


def _needed(directory: Path) -> set[str]:
    """Records, the files they need, and the lock: all a directory should hold."""
    names = {LOCK_NAME}
    for step, doc in _records(directory).items():
        names.add(f"step-{step:08d}.json")
        names.add(doc["data"])
        names |= {row[1] for row in doc.get("storages") or ()}
    return names


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


# --------------------------------------------------------------------------- the manager


def test_the_second_save_writes_only_what_changed(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        full, second = os.path.getsize(mgr.path(0)), os.path.getsize(mgr.path(1))
        payload = (FROZEN + FROZEN // 2 + 64) * 4
        assert full > payload and second < 3 * 4096 + 4096  # header + the 256-byte head
        rec = _records(tmp_path)[1]
        holders = {row[1] for row in rec["storages"]}
        assert holders == {os.path.basename(mgr.path(0)), os.path.basename(mgr.path(1))}
        with open(mgr.path(1), "rb") as f:
            assert struct.unpack_from("<8sHH", f.read(12))[1:] == (1, 1)  # format 1.1
        for step in (0, 1):
            assert _same(mgr.load(step), _state(step))
            assert _same(tensorfile.load(mgr.path(step)), _state(step))


def test_incremental_false_writes_every_byte(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, incremental=False, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        assert os.path.getsize(mgr.path(1)) == os.path.getsize(mgr.path(0))
        assert "storages" not in _records(tmp_path)[1] or _records(tmp_path)[1]["storages"] is None


def test_every_entry_point_reads_a_referring_checkpoint(tmp_path: Path, capsys: Any) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        path = mgr.path(1)
    want = _state(1)
    with tensorfile.open(path) as f:
        assert torch.equal(f.get("model.embed"), want["model"]["embed"])
        assert torch.equal(f.get("model.head"), want["model"]["head"])
    assert _same(tensorfile.load(path, mmap=True), want)
    assert tensorfile.load(path, map_location="meta")["model"]["embed"].is_meta
    # verify, inspect and convert through the command line
    assert cli_main(["verify", path], standalone_mode=False) in (None, 0)
    assert cli_main(["inspect", path], standalone_mode=False) in (None, 0)
    out = capsys.readouterr().out
    assert "1.1" in out and "step-00000000" in out  # the referenced storages name their file
    for suffix in (".tf", ".safetensors", ".pt"):
        dst = str(tmp_path.parent / f"converted{suffix}")
        obj = want if suffix != ".safetensors" else None
        extra = ["--skip-non-tensors"] if suffix == ".safetensors" else []
        cli_main(["convert", path, dst, *extra], standalone_mode=False)
        got = tensorfile.load(dst)
        if obj is None:
            assert torch.equal(got["model.embed"], want["model"]["embed"])
        else:
            assert _same(got, obj)


def test_in_place_loads_read_referenced_storages_into_the_destinations(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        dest = {k: torch.empty_like(v) for k, v in _state(9)["model"].items()}
        ptrs = {k: v.data_ptr() for k, v in dest.items()}
        got = mgr.load(1, into={"model": dest})
    assert all(got["model"][k] is dest[k] and dest[k].data_ptr() == ptrs[k] for k in dest)
    assert _same(got, _state(1))


def test_async_saves_are_incremental_too(tmp_path: Path) -> None:
    state = _state(0)
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        for step in range(3):
            state["model"]["head"].fill_(float(step))
            state["step"] = step
            mgr.save(step, state, block=False)
        mgr.wait()
        sizes = [os.path.getsize(mgr.path(s)) for s in range(3)]
        assert sizes[1] < sizes[0] // 10 and sizes[2] < sizes[0] // 10
        for step in range(3):
            assert _same(mgr.load(step), _state(step))


def test_a_held_file_stays_until_no_checkpoint_needs_it(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, keep_last=1, durable=False) as mgr:
        mgr.save(0, _state(0))
        first = os.path.basename(mgr.path(0))
        mgr.save(1, _state(1))
        assert mgr.steps() == [1]
        assert first in os.listdir(tmp_path)  # step 1 reads its frozen tensors from it
        assert _same(mgr.load(1), _state(1))
        changed = _state(2)
        changed["model"]["embed"] = changed["model"]["embed"] + 1
        changed["model"]["layer"] = changed["model"]["layer"] + 1
        mgr.save(2, changed)
        assert mgr.steps() == [2]
        assert first not in os.listdir(tmp_path)  # nothing needs it any more
        assert set(os.listdir(tmp_path)) == _needed(tmp_path)
        assert _same(mgr.load(2), changed)


def test_deleting_the_holder_checkpoint_keeps_its_bytes(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        mgr.delete(0)
        assert mgr.steps() == [1]
        assert _same(mgr.load(1), _state(1))
    # A new writing manager keeps it too: it is needed, not a leftover.
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        assert _same(mgr.load(1), _state(1))
        assert set(os.listdir(tmp_path)) == _needed(tmp_path)


def test_a_missing_holder_makes_the_checkpoint_not_whole(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        holder = mgr.path(0)
        path = mgr.path(1)
        os.unlink(holder)
        assert mgr.steps() == []
        with pytest.raises(FormatError, match=r"step-00000000.*missing"):
            tensorfile.load(path)


def test_a_damaged_held_storage_is_a_checksum_error(tmp_path: Path) -> None:
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, _state(0))
        mgr.save(1, _state(1))
        with tensorfile.open(mgr.path(0)) as f:
            del f
        lay_end = os.path.getsize(mgr.path(0))
        with open(mgr.path(0), "r+b") as f:  # a byte of the frozen embedding
            f.seek(lay_end - 4096 * 40)
            b = f.read(1)
            f.seek(lay_end - 4096 * 40)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(tensorfile.ChecksumError):
            mgr.load(1)
        with pytest.raises(tensorfile.ChecksumError):
            tensorfile.load(mgr.path(1))


def test_equal_storages_held_once_still_load_as_two(tmp_path: Path) -> None:
    a = torch.arange(4096.0)
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, {"a": a})
        mgr.save(1, {"a": a.clone(), "b": a.clone()})
        got = mgr.load(1)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], a)
    assert got["a"].untyped_storage().data_ptr() != got["b"].untyped_storage().data_ptr()
    got["a"][0] = -1
    assert got["b"][0] == 0


def test_a_tensor_changed_during_an_incremental_save_fails_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    state = {"frozen": torch.arange(8192.0), "trained": torch.zeros(8192)}
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, state)
        real = _io.write_storages

        def racing(*args: Any, **kwargs: Any) -> Any:
            state["trained"].add_(1)  # another thread writes between the digest and the copy
            return real(*args, **kwargs)

        monkeypatch.setattr(_io, "write_storages", racing)
        state["trained"].fill_(5)
        with pytest.raises(RuntimeError, match="changed while it was being saved"):
            mgr.save(1, state)
        monkeypatch.setattr(_io, "write_storages", real)
        assert mgr.steps() == [0]
        assert set(os.listdir(tmp_path)) == _needed(tmp_path)


def test_a_tensor_changed_during_a_first_incremental_save_fails_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # Nothing to refer to yet, but the digests recorded must still be of the bytes written.
    state = {"w": torch.zeros(8192)}
    real = _io.write_storages

    def racing(*args: Any, **kwargs: Any) -> Any:
        state["w"].add_(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_io, "write_storages", racing)
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        with pytest.raises(RuntimeError, match="changed while it was being saved"):
            mgr.save(0, state)
        assert mgr.steps() == []


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["save", "save", "save", "delete"]), st.integers(0, 5)),
        min_size=1,
        max_size=12,
    ),
    keep_last=st.one_of(st.none(), st.integers(1, 3)),
)
def test_retention_never_removes_bytes_a_checkpoint_needs(
    tmp_path_factory: Any, ops: list[tuple[str, int]], keep_last: int | None
) -> None:
    directory = tmp_path_factory.mktemp("run")
    pool = [torch.full((1024,), float(v)) for v in range(4)]  # values repeat across steps
    saved: dict[int, dict[str, Any]] = {}
    with tensorfile.CheckpointManager(directory, keep_last=keep_last, durable=False) as mgr:
        for n, (op, step) in enumerate(ops):
            if op == "save":
                obj = {"a": pool[(step + n) % 4].clone(), "b": pool[step % 4].clone(), "n": n}
                mgr.save(step, obj)
                saved[step] = obj
            elif step in mgr.steps():
                mgr.delete(step)
            for s in mgr.steps():
                assert _same(mgr.load(s), saved[s])
            assert set(os.listdir(directory)) == _needed(directory)


# --------------------------------------------------------------------------- the format


def _referring_file(directory: Path, name: str = "b.tf", holder: str = "a.tf") -> str:
    """a.tf holds {"w"}; b.tf refers to it for "w" and holds "x" itself."""
    w = torch.arange(2048.0)
    tensorfile.save({"w": w}, directory / holder)
    with tensorfile.open(directory / holder) as f:
        del f
    reuse = _io.Reuse({})
    with no_gc():
        _io.save({"w": w}, str(directory / "probe.tf"), durable=False, num_threads=1,
                 metadata=None, reuse=reuse)  # fmt: skip
    os.unlink(directory / "probe.tf")
    index = {reuse.digests[0]: _io.Held(holder, 0, int(reuse.nbytes[0]), int(reuse.crcs[0]))}
    with no_gc():
        _io.save({"w": w, "x": torch.ones(3)}, str(directory / name), durable=False,
                 num_threads=1, metadata=None, reuse=_io.Reuse(index))  # fmt: skip
    return str(directory / name)


def _rewrite_header(path: str, edit: Any, minor: int = 1) -> None:
    """Rewrites a file's header through `edit(doc)`, keeping it valid otherwise."""
    with open(path, "rb") as f:
        raw = f.read()
    _, _, _, _, hlen, _ = native.PREAMBLE.unpack_from(raw)
    doc = json.loads(raw[32 : 32 + hlen])
    edit(doc)
    header = json.dumps(doc, separators=(",", ":")).encode()
    data = raw[native.data_start(hlen) :]
    start = native.data_start(len(header))
    total = start + len(data) if data else 32 + len(header)
    body = native.make_preamble(header, total, minor) + header
    with open(path, "wb") as f:
        f.write(body + bytes(start - len(body)) + data if data else body)


def test_a_reference_is_read_from_its_holder(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "a.tf")
    got = tensorfile.load(path)
    assert torch.equal(got["w"], torch.arange(2048.0)) and torch.equal(got["x"], torch.ones(3))
    assert tensorfile.open(path).keys() == ["w", "x"]


@pytest.mark.parametrize("target", ["../a.tf", "/etc/passwd", "sub/a.tf", ".hidden", ""])
def test_a_reference_outside_the_directory_is_refused(tmp_path: Path, target: str) -> None:
    path = _referring_file(tmp_path)

    def edit(doc: dict[str, Any]) -> None:
        doc["storages"][0][3][1] = target

    _rewrite_header(path, edit)
    with pytest.raises(FormatError, match="not a file name of the same directory"):
        tensorfile.load(path)


def test_a_holder_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)
    os.rename(tmp_path / "a.tf", tmp_path / "elsewhere.tf")
    os.symlink(tmp_path / "elsewhere.tf", tmp_path / "a.tf")
    with pytest.raises(FormatError, match="symbolic link"):
        tensorfile.load(path)


def test_a_different_file_under_the_holders_name_is_refused(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)
    tensorfile.save({"w": torch.arange(2048.0) + 1}, tmp_path / "a.tf")
    with pytest.raises(FormatError, match="checksum differs"):
        tensorfile.load(path)


def test_a_reference_to_a_reference_is_refused(tmp_path: Path) -> None:
    _referring_file(tmp_path, name="b.tf")
    c = _referring_file(tmp_path, name="c.tf", holder="a2.tf")

    def edit(doc: dict[str, Any]) -> None:
        doc["storages"][0][3][1] = "b.tf"

    _rewrite_header(c, edit)
    with pytest.raises(FormatError, match="itself a reference"):
        tensorfile.load(c)


def test_a_reference_in_a_version_1_0_file_is_refused(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)
    _rewrite_header(path, lambda doc: None, minor=0)
    with pytest.raises(FormatError, match=r"needs format 1\.1"):
        tensorfile.load(path)


def test_a_newer_minor_version_is_refused_by_name(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)

    def edit(doc: dict[str, Any]) -> None:
        doc["storages"][0].append(["future", 1])

    _rewrite_header(path, edit, minor=2)
    with pytest.raises(FormatError, match=r"format 1\.2, newer than the 1\.1 this reader"):
        tensorfile.load(path)


def test_a_referring_file_read_as_a_stream_is_refused(tmp_path: Path) -> None:
    path = _referring_file(tmp_path)
    with open(path, "rb") as f, pytest.raises(FormatError, match="open it by path"):
        tensorfile.load(f)


def test_files_without_references_stay_version_1_0(tmp_path: Path) -> None:
    tensorfile.save({"w": torch.ones(3)}, tmp_path / "x.tf")
    with open(tmp_path / "x.tf", "rb") as f:
        assert struct.unpack_from("<8sHH", f.read(12))[1:] == (1, 0)


def test_numpy_storages_are_referenced_too(tmp_path: Path) -> None:
    arr = np.arange(8192, dtype=np.float32)
    with tensorfile.CheckpointManager(tmp_path, durable=False) as mgr:
        mgr.save(0, {"a": arr})
        mgr.save(1, {"a": arr.copy(), "b": np.zeros(2)})
        assert os.path.getsize(mgr.path(1)) < arr.nbytes
        got = mgr.load(1)
    assert np.array_equal(got["a"], arr) and np.array_equal(got["b"], np.zeros(2))
