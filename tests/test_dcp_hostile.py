"""Hostile DCP checkpoint directories: tensorfile's own commit record, torch's stock
`.metadata` pickle, links and names that point outside the directory. Every one must
raise FormatError naming the file (through read_metadata, dcp_to_state_dict and the
command line), in time and memory proportional to its size, and nothing outside the
directory may be opened."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tensorfile
import tensorfile.dcp as tdcp
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from tensorfile.cli import main as cli
from torch.distributed.checkpoint.api import CheckpointException

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _ours(tmp_path: Path, name: str = "ck") -> tuple[Path, Path, dict[str, Any]]:
    d = tmp_path / name
    tdcp.state_dict_to_dcp({"w": torch.randn(64), "l": [torch.ones(2)], "n": 3}, d)
    p = d / tdcp.METADATA_NAME
    return d, p, json.loads(p.read_bytes())


def _stock(tmp_path: Path, name: str = "st") -> tuple[Path, Any]:
    d = tmp_path / name
    dcp.save(
        {"w": torch.arange(12.0).reshape(4, 3), "n": 5},
        storage_writer=dcp.FileSystemWriter(d),
        no_dist=True,
    )
    return d, pickle.loads((d / ".metadata").read_bytes())


def _index(doc: dict[str, Any], fqn: str) -> int:
    return doc["storage_data"]["fqn"].index(fqn)


def _set(doc: dict[str, Any], column: str, fqn: str, value: Any) -> None:
    doc["storage_data"][column][_index(doc, fqn)] = value


def _refused_everywhere(d: Path, where: Path, message: str) -> None:
    """read_metadata, dcp_to_state_dict and `tensorfile convert` all refuse `d` with a
    FormatError naming `where`; the command line says it in one line, no traceback."""
    if where.name == tdcp.METADATA_NAME:
        with pytest.raises(tensorfile.FormatError, match=message) as info:
            tdcp.read_metadata(d)
        assert str(where) in str(info.value)
    with pytest.raises(tensorfile.FormatError, match=message) as info:
        tdcp.dcp_to_state_dict(d)
    assert str(where) in str(info.value)
    r = CliRunner().invoke(cli, ["convert", str(d), str(d.parent / "out.tf")])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # a one-line error, not a traceback
    assert str(where) in r.output and len(r.output.strip().splitlines()) == 1, r.output


_EDITS = {
    # a 4 TiB tensor that no chunk holds: allocated from its size alone before
    "size 2**40, no chunks": (
        lambda d: (
            d["state_dict_metadata"]["w"].__setitem__(1, [2**40])
            or d["state_dict_metadata"]["w"].__setitem__(2, [])
        ),
        "no chunk holds",
    ),
    "overlapping chunks": (
        lambda d: d["state_dict_metadata"]["w"].__setitem__(2, [[[0], [40]], [[24], [40]]]),
        "overlap",
    ),
    "a chunk short of the tensor": (
        lambda d: d["state_dict_metadata"]["w"].__setitem__(2, [[[0], [32]]]),
        "uncovered",
    ),
    "byte count not the chunk's": (lambda d: _set(d, "nbytes", "w", 100), "the chunk holds 256"),
    "a BYTE_IO value larger than its file": (
        lambda d: _set(d, "nbytes", "n", 2**40),
        "more than its",
    ),
    "65 dimensions": (
        lambda d: d["state_dict_metadata"]["w"].__setitem__(1, [1] * 65),
        "bad shape",
    ),
    "a dimension of 2**64": (
        lambda d: d["state_dict_metadata"]["w"].__setitem__(1, [2**64, 0]),
        "bad shape",
    ),
    "a negative dimension": (
        lambda d: d["state_dict_metadata"]["w"].__setitem__(1, [-64]),
        "bad shape",
    ),
    # rebuilding the nested dict appended 10**8 Nones to a list (23 s, 3.2 GB)
    "planner-data index 10**8": (
        lambda d: d["planner_data"]["mappings"].__setitem__("l.0", ["l", 10**8]),
        "empty list slots",
    ),
    "planner-data key path of 10**5 parts": (
        lambda d: d["planner_data"]["mappings"].__setitem__("w", ["w"] * 10**5),
        "more than 200 parts",
    ),
    "planner data for a key the checkpoint lacks": (
        lambda d: d["planner_data"]["mappings"].__setitem__("ghost", ["ghost"]),
        "does not hold",
    ),
    "planner data nested 300 deep": (
        lambda d: d.__setitem__("planner_data", {"value": json.loads("[" * 300 + "]" * 300)}),
        "nested more than",
    ),
    "a storage entry for no chunk": (lambda d: _set(d, "fqn", "w", "ghost"), "matches no chunk"),
    "a storage entry for a chunk that is not there": (
        lambda d: _set(d, "offset", "w", [0, 0]),
        "matches no chunk",
    ),
    "a rank file named outside": (lambda d: d["files"][0].__setitem__(0, "../x.tf"), "files"),
    "a quantized dtype": (lambda d: d["properties"][0].__setitem__(0, "qint8"), "dtype 'qint8'"),
}


@pytest.mark.parametrize("case", sorted(_EDITS))
def test_hostile_commit_record_is_a_format_error(tmp_path: Path, case: str) -> None:
    edit, message = _EDITS[case]
    d, p, doc = _ours(tmp_path)
    edit(doc)
    p.write_text(json.dumps(doc))
    _refused_everywhere(d, p, message)


def test_duplicate_json_keys_are_refused(tmp_path: Path) -> None:
    d, p, doc = _ours(tmp_path)
    text = json.dumps(doc).replace(
        '"format_version": 1', '"format_version": 1, "format_version": 1'
    )
    p.write_text(text)
    _refused_everywhere(d, p, "duplicate key 'format_version'")


def _run(code: str, *, memory_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (a crash there must not end the test run)."""
    prelude = "import warnings; warnings.simplefilter('ignore')\n"
    if memory_limit:
        prelude += (
            "import resource\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory_limit}, {memory_limit}))\n"
        )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_deep_json_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """A commit record nested 10**6 deep overflowed the C stack of the JSON parser once
    the caller had raised the recursion limit (SIGSEGV)."""
    d, p, _ = _ours(tmp_path)
    p.write_text('{"format": "tensorfile-dcp", "planner_data": ' + "[" * 10**6 + "]" * 10**6 + "}")
    proc = _run(
        f"""
        import sys, tensorfile.dcp as tdcp
        sys.setrecursionlimit(10**8)
        try:
            tdcp.read_metadata({str(d)!r})
        except tdcp.IncompleteCheckpointError as e:
            print("incomplete", e)
        except ValueError as e:
            print(type(e).__name__, e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("FormatError") and "nested more than 208 deep" in proc.stdout
    assert str(p) in proc.stdout


def test_rank_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    d, p, doc = _ours(tmp_path)
    (name, _), *_ = doc["files"]
    outside = tmp_path / "elsewhere.tf"
    shutil.move(d / name, outside)
    os.symlink(outside, d / name)
    with pytest.raises(tensorfile.FormatError, match=f"rank file {name} is a symbolic link"):
        tdcp.read_metadata(d)
    with pytest.raises(CheckpointException, match="symbolic link"):
        dcp.load({"w": torch.zeros(64)}, storage_reader=tdcp.StorageReader(d), no_dist=True)
    _refused_everywhere(d, p, "symbolic link")


def test_commit_record_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    d, p, _ = _ours(tmp_path)
    shutil.move(p, tmp_path / "record.json")
    os.symlink(tmp_path / "record.json", p)
    with pytest.raises(tensorfile.FormatError, match="symbolic link"):
        tdcp.read_metadata(d)


def test_rank_file_swapped_for_a_link_after_the_check_is_refused(tmp_path: Path) -> None:
    """The rank file is opened inside the directory without following links, even when
    the commit record's checks ran before the swap."""
    d, _p, doc = _ours(tmp_path)
    (name, _), *_ = doc["files"]
    reader = tdcp.StorageReader(d)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    shutil.move(d / name, tmp_path / "moved.tf")
    os.symlink(tmp_path / "moved.tf", d / name)
    with pytest.raises(CheckpointException, match="symbolic link"):
        dcp.load({"w": torch.zeros(64)}, storage_reader=reader, no_dist=True)


def test_truncated_rank_file_through_dcp_load_names_the_truncation(tmp_path: Path) -> None:
    """dcp.load falls back to a per-rank record when the global one fails; the message
    for that fallback must not call the checkpoint uncommitted."""
    d, _p, doc = _ours(tmp_path)
    (name, size), *_ = doc["files"]
    os.truncate(d / name, 100)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(64)}, storage_reader=tdcp.StorageReader(d), no_dist=True)
    text = str(info.value)
    assert f"{name} holds 100 bytes, the commit recorded {size}" in text
    assert "did not commit" not in text and "incomplete" not in text
    assert "no per-rank commit record" in text


def test_byte_io_value_is_read_without_running_code(tmp_path: Path) -> None:
    """BYTE_IO values are torch.save pickles; one that calls os.system is refused by name
    with a FormatError (torch.load(weights_only=True) raised UnpicklingError inside dcp.load)."""

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    d, p, doc = _ours(tmp_path)
    (name, _), *_ = doc["files"]
    items = tensorfile.load(d / name)
    blob = io.BytesIO()
    torch.save(Evil(), blob)
    items["n"] = torch.frombuffer(bytearray(blob.getvalue()), dtype=torch.uint8)
    tensorfile.save(items, d / name)
    doc["files"][0][1] = os.path.getsize(d / name)
    _set(doc, "nbytes", "n", len(blob.getvalue()))
    p.write_text(json.dumps(doc))
    with pytest.raises(tensorfile.FormatError, match=r"'n'.*posix\.system"):
        tdcp.dcp_to_state_dict(d)
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- stock .metadata


def _write_stock(d: Path, md: Any) -> Path:
    p = d / ".metadata"
    p.write_bytes(pickle.dumps(md))
    return p


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_stock_relative_path_outside_the_directory_is_refused(tmp_path: Path, how: str) -> None:
    """`convert DIR out.tf` copied a file from outside the directory."""
    d, md = _stock(tmp_path)
    outside = tmp_path / "outside.distcp"
    shutil.move(d / "__0_0.distcp", outside)
    for info in md.storage_data.values():
        info.relative_path = str(outside) if how == "absolute" else "../outside.distcp"
    p = _write_stock(d, md)
    _refused_everywhere(d, p, "not inside the directory")


def test_stock_data_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    d, _md = _stock(tmp_path)
    outside = tmp_path / "outside.distcp"
    shutil.move(d / "__0_0.distcp", outside)
    os.symlink(outside, d / "__0_0.distcp")
    _refused_everywhere(d, d / ".metadata", "symbolic link")


def test_stock_huge_size_without_chunks_is_refused(tmp_path: Path) -> None:
    d, md = _stock(tmp_path)
    md.state_dict_metadata["w"].size = torch.Size([2**40])
    md.state_dict_metadata["w"].chunks = []
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != "w"}
    p = _write_stock(d, md)
    _refused_everywhere(d, p, "no chunk holds")


def test_stock_entry_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    d, md = _stock(tmp_path)
    for index, info in md.storage_data.items():
        if index.fqn == "n":
            info.length = 2**40
    p = _write_stock(d, md)
    _refused_everywhere(d, p, "past the end of the file")


def test_stock_pickle_nested_a_million_deep_does_not_crash(tmp_path: Path) -> None:
    """A dict keyed by a tuple nested 10**6 deep (no globals) overflowed the C stack while
    the key was hashed (SIGSEGV)."""
    d, _md = _stock(tmp_path)
    (d / ".metadata").write_bytes(b"\x80\x04}K\x01" + b"\x85" * 10**6 + b"Ns.")
    proc = _run(
        f"""
        import tensorfile.dcp as tdcp
        try:
            tdcp.dcp_to_state_dict({str(d)!r})
        except ValueError as e:
            print(type(e).__name__, e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("FormatError"), proc.stdout
    assert "nested more than 200 deep" in proc.stdout and str(d / ".metadata") in proc.stdout


def test_stock_pickle_memo_bomb_costs_what_it_weighs(tmp_path: Path) -> None:
    """`LONG_BINPUT 2**29` (9 bytes) made the C unpickler zero-fill an 8 GiB memo; under a
    3 GiB address-space limit that was a MemoryError."""
    d, _md = _stock(tmp_path)
    (d / ".metadata").write_bytes(b"\x80\x04N" + b"r" + (2**29).to_bytes(4, "little") + b".")
    proc = _run(
        f"""
        import tensorfile.dcp as tdcp
        try:
            tdcp.dcp_to_state_dict({str(d)!r})
        except ValueError as e:
            print(type(e).__name__, e)
        """,
        memory_limit=3 << 30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("FormatError") and "not DCP Metadata" in proc.stdout


def test_stock_pickle_cannot_set_attributes_of_classes(tmp_path: Path) -> None:
    """BUILD with slot state on an allowed global (a class) would set attributes on the
    class itself, for the whole process."""
    d, _md = _stock(tmp_path)
    evil = (
        b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\n"
        b"N}\x8c\x06markerK\x01s\x86b."  # BUILD(Metadata, (None, {"marker": 1}))
    )
    (d / ".metadata").write_bytes(evil)
    with pytest.raises(tensorfile.FormatError, match="BUILD of type"):
        tdcp.dcp_to_state_dict(d)
    from torch.distributed.checkpoint.metadata import Metadata

    assert not hasattr(Metadata, "marker")


def test_stock_storage_meta_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    """A fuzzer finding: storage_meta was used as a StorageMeta without a check."""
    d, md = _stock(tmp_path)
    md.storage_meta = {"checkpoint_id": 1}
    p = _write_stock(d, md)
    _refused_everywhere(d, p, "storage_meta")


def test_stock_data_file_that_is_missing_is_an_incomplete_checkpoint(tmp_path: Path) -> None:
    d, _md = _stock(tmp_path)
    (d / "__0_0.distcp").unlink()
    with pytest.raises(tdcp.IncompleteCheckpointError, match=r"__0_0\.distcp, which .* is missing"):
        tdcp.dcp_to_state_dict(d)
