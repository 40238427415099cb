"""Checkpoint directories read whole, one tensor at a time: tensors assembled from chunks
of any layout through small steps, `convert` streaming with bounded memory, and
`verify` / `inspect` of a directory."""

from __future__ import annotations

import json
import math
import os
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
from tensorfile.dcp import _assemble
from tensorfile.dcp._writer import _block_checksums

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

Box = tuple[tuple[int, ...], tuple[int, ...]]


def _chunked(d: Path, full: dict[str, torch.Tensor], boxes: dict[str, list[Box]]) -> Path:
    """A checkpoint directory in this plugin's format whose tensors are saved as the
    given chunks (offsets, sizes), in one rank file, as a sharded save would leave them."""
    d.mkdir()
    items: dict[str, torch.Tensor] = {}
    for fqn, t in full.items():
        for off, sz in boxes[fqn]:
            key = f"{fqn}@{','.join(map(str, off))}"
            items[key] = t[tuple(slice(o, o + s) for o, s in zip(off, sz))].contiguous()
    name = "__0_00000000000000ab.tf"
    tensorfile.save(items, d / name)
    blocks = _block_checksums(items, None)
    props: list[list[Any]] = []
    sdm, fq, offs, nb, crcs = {}, [], [], [], {}
    for fqn, t in full.items():
        row = [str(t.dtype).removeprefix("torch."), False, "contiguous_format", False]
        if row not in props:
            props.append(row)
        sdm[fqn] = [props.index(row), list(t.shape), [[list(o), list(s)] for o, s in boxes[fqn]]]
        for off, sz in boxes[fqn]:
            key = f"{fqn}@{','.join(map(str, off))}"
            if key in blocks:
                crcs[str(len(fq))] = list(blocks[key])
            fq.append(fqn)
            offs.append(list(off))
            nb.append(math.prod(sz) * t.element_size())
    doc = {
        "format": "tensorfile-dcp",
        "format_version": 1,
        "dcp_version": "1.0.0",
        "block_nbytes": 1 << 20,
        "files": [[name, os.path.getsize(d / name)]],
        "properties": props,
        "state_dict_metadata": sdm,
        "planner_data": {"mappings": {fqn: fqn.split(".") for fqn in full}},
        "storage_data": {
            "fqn": fq,
            "offset": offs,
            "index": [0] * len(fq),
            "file": [0] * len(fq),
            "nbytes": nb,
            "block_crcs": crcs,
        },
        "storage_meta": None,
    }
    (d / tdcp.METADATA_NAME).write_text(json.dumps(doc))
    return d


def _grid(shape: tuple[int, ...], cuts: list[list[int]]) -> list[Box]:
    """The chunks of a regular sharding: the product of per-dimension cut points."""
    spans = [list(zip([0, *c], [*c, n])) for c, n in zip(cuts, shape)]
    out: list[Box] = [((), ())]
    for dim in spans:
        out = [((*o, a), (*s, b - a)) for o, s in out for a, b in dim]
    return out


_LAYOUTS: dict[str, tuple[tuple[int, ...], Any, list[Box]]] = {
    "rows": ((37, 23), torch.float32, _grid((37, 23), [[10, 30], []])),
    "rows and columns": ((37, 23), torch.float64, _grid((37, 23), [[10], [5, 6]])),
    "columns only": ((9, 40), torch.int16, _grid((9, 40), [[], [1, 20, 39]])),
    "not a grid": (
        (5, 7, 9),
        torch.bfloat16,
        [
            ((0, 0, 0), (5, 3, 9)),
            ((0, 3, 0), (2, 4, 9)),
            ((2, 3, 0), (3, 4, 4)),
            ((2, 3, 4), (3, 4, 5)),
        ],
    ),
    "one dimension": ((1000,), torch.int64, [((0,), (300,)), ((300,), (700,))]),
    "with an empty chunk": ((8, 3), torch.float32, [((0, 0), (8, 3)), ((8, 0), (0, 3))]),
    "a scalar": ((), torch.float32, [((), ())]),
    "bool": ((6, 5), torch.bool, _grid((6, 5), [[3], [2]])),
    "large, block checksums": ((1024, 1536), torch.float32, _grid((1024, 1536), [[500], [700]])),
}


def _value(shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.arange(n) % 3 == 0).reshape(shape)
    return (torch.arange(n, dtype=torch.float64) * 1.5 - 7).to(dtype).reshape(shape)


@pytest.mark.parametrize("step", [64, 4096, 1 << 20])
@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_tensors_are_assembled_from_any_chunk_layout(
    tmp_path: Path, monkeypatch: Any, layout: str, step: int
) -> None:
    """Steps smaller than a row (64 bytes), than the tensor (4 KiB) and larger: every
    element comes from its chunk, each chunk's checksums are checked as it is read."""
    shape, dtype, boxes = _LAYOUTS[layout]
    monkeypatch.setattr(_assemble, "SLAB_NBYTES", step)
    full = {"m.w": _value(shape, dtype), "m.v": torch.arange(10.0)}
    d = _chunked(tmp_path / "ck", full, {"m.w": boxes, "m.v": [((0,), (10,))]})
    got = tdcp.dcp_to_state_dict(d)
    assert got["m"]["w"].dtype == dtype and torch.equal(got["m"]["w"], full["m.w"])
    tensorfile.dcp.convert_checkpoint(str(d), str(tmp_path / "out.tf"), "tensorfile")
    back = tensorfile.load(tmp_path / "out.tf")
    assert torch.equal(back["m"]["w"], full["m.w"]) and torch.equal(back["m"]["v"], full["m.v"])


def test_a_damaged_chunk_is_caught_while_assembling(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(_assemble, "SLAB_NBYTES", 4096)
    full = {"w": _value((64, 64), torch.float32)}
    d = _chunked(tmp_path / "ck", full, {"w": _grid((64, 64), [[32], [16]])})
    (name,) = [n for n in os.listdir(d) if n.endswith(".tf")]
    with tensorfile.open(d / name) as f:
        at = int(f._reader.layout.storage_offsets[2]) + 100
    raw = bytearray((d / name).read_bytes())
    raw[at] ^= 1
    (d / name).write_bytes(bytes(raw))
    with pytest.raises(tensorfile.ChecksumError, match="checksum mismatch") as info:
        tdcp.dcp_to_state_dict(d)
    assert name in str(info.value)
    r = CliRunner().invoke(cli, ["convert", str(d), str(tmp_path / "out.tf")])
    assert r.exit_code == 1 and "checksum mismatch" in r.output
    assert not (tmp_path / "out.tf").exists()


def _stock_and_ours(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    state = {
        "model": {"w": torch.randn(33, 7), "b": torch.arange(4.0), "m": torch.tensor([True])},
        "step": 12,
        "opt": {"lr": 0.5, "betas": (0.9, torch.tensor(0.99))},
    }
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    tdcp.state_dict_to_dcp(state, ours)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(stock), no_dist=True)
    return ours, stock, state


@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_convert_streams_each_writer_to_both_formats(tmp_path: Path, writer: str) -> None:
    ours, stock, state = _stock_and_ours(tmp_path)
    src = ours if writer == "ours" else stock
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "x.tf")])
    assert r.exit_code == 0, r.output
    got = tensorfile.load(tmp_path / "x.tf")
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["step"] == 12
    assert got["opt"]["betas"][0] == 0.9 and torch.equal(got["opt"]["betas"][1], torch.tensor(0.99))
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "--skip-non-tensors" in r.output and "step" in r.output
    args = ["convert", str(src), str(tmp_path / "x.safetensors"), "--skip-non-tensors"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    flat = tensorfile.load(tmp_path / "x.safetensors")
    assert sorted(flat) == ["model.b", "model.m", "model.w", "opt.betas.1"]
    assert torch.equal(flat["model.w"], state["model"]["w"])


def test_convert_memory_is_bounded_by_its_buffers(tmp_path: Path) -> None:
    """A 128 MiB checkpoint converts with far less than 128 MiB of extra memory (it held
    the whole state, 784-809 MiB for a 512 MiB one)."""
    g = torch.Generator().manual_seed(0)
    tdcp.state_dict_to_dcp(
        {f"w{i}": torch.randn(2048, 4096, generator=g) for i in range(4)},
        tmp_path / "big",
        durable=False,
    )
    tdcp.state_dict_to_dcp({"w": torch.randn(8)}, tmp_path / "small")
    code = f"""
        import resource, warnings
        warnings.simplefilter("ignore")
        import tensorfile.dcp as tdcp
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tdcp.convert_checkpoint({str(tmp_path / "small")!r}, {str(tmp_path / "s.tf")!r}, "tensorfile")
        before = peak()
        tdcp.convert_checkpoint({str(tmp_path / "big")!r}, {str(tmp_path / "b.tf")!r}, "tensorfile")
        print(peak() - before)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    grew = int(proc.stdout.split()[-1])
    assert grew < 80 << 20, f"convert grew by {grew / 2**20:.0f} MiB"
    back = tensorfile.load(tmp_path / "b.tf")
    want = tdcp.dcp_to_state_dict(tmp_path / "big")
    assert all(torch.equal(back[k], want[k]) for k in want)


# --------------------------------------------------------------------------- verify, inspect


@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_verify_takes_a_checkpoint_directory(tmp_path: Path, writer: str) -> None:
    ours, stock, _ = _stock_and_ours(tmp_path)
    d = ours if writer == "ours" else stock
    r = CliRunner().invoke(cli, ["verify", str(d)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"ok   {d} (dcp (") and "3 tensors" in r.output
    # A flipped byte in a data file fails it, naming the file.
    data = sorted(p for p in d.iterdir() if p.suffix in (".tf", ".distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[-8] ^= 0x10  # inside the last item's bytes
    data.write_bytes(bytes(raw))
    r = CliRunner().invoke(cli, ["verify", str(d), str(ours if d == stock else stock)])
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("FAIL ") and str(data) in lines[0], r.output
    assert lines[1].startswith("ok   "), r.output


def test_verify_checks_the_block_checksums_against_the_data(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp({"big": torch.randn(1024, 1024)}, d)  # 4 MiB: four blocks
    p = d / tdcp.METADATA_NAME
    doc = json.loads(p.read_text())
    (crcs,) = doc["storage_data"]["block_crcs"].values()
    crcs[1] ^= 1
    p.write_text(json.dumps(doc))
    tensorfile.load(d / doc["files"][0][0])  # the rank file itself is sound
    r = CliRunner().invoke(cli, ["verify", str(d)])
    assert r.exit_code == 1 and "'big@0,0' checksum mismatch" in r.output, r.output


def test_verify_of_an_uncommitted_directory_fails(tmp_path: Path) -> None:
    ours, _stock, _ = _stock_and_ours(tmp_path)
    (ours / tdcp.METADATA_NAME).unlink()
    r = CliRunner().invoke(cli, ["verify", str(ours)])
    assert r.exit_code == 1 and "did not commit" in r.output


@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_inspect_takes_a_checkpoint_directory(tmp_path: Path, writer: str) -> None:
    ours, stock, _ = _stock_and_ours(tmp_path)
    d = ours if writer == "ours" else stock
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert r.exit_code == 0, r.output
    row = next(line.split() for line in r.output.splitlines() if line.startswith("model.w "))
    assert row == ["model.w", "float32", "33x7", "924", "1"], r.output
    r = CliRunner().invoke(cli, ["inspect", "--json", str(d)])
    info = json.loads(r.output)
    w = next(t for t in info["tensors"] if t["key"] == "model.w")
    assert (
        w["shape"] == [33, 7] and w["nbytes"] == 33 * 7 * 4 and w["chunks"] == [[[0, 0], [33, 7]]]
    )
    assert sorted(info["values"]) == ["opt.betas", "opt.lr", "step"]
    assert info["writer"] == (
        "tensorfile.dcp.StorageWriter" if d == ours else "torch FileSystemWriter"
    )
    assert sum(f["items"] for f in info["files"]) == 6


def test_assembled_bytes_are_checked_for_bool(tmp_path: Path) -> None:
    full = {"m": torch.tensor([True, False, True, True])}
    d = _chunked(tmp_path / "ck", full, {"m": [((0,), (2,)), ((2,), (2,))]})
    (name,) = [n for n in os.listdir(d) if n.endswith(".tf")]
    items = tensorfile.load(d / name)
    items["m@2"] = torch.tensor([2, 1], dtype=torch.uint8).view(torch.bool)
    tensorfile.save(items, d / name)
    doc = json.loads((d / tdcp.METADATA_NAME).read_text())
    doc["files"][0][1] = os.path.getsize(d / name)
    (d / tdcp.METADATA_NAME).write_text(json.dumps(doc))
    with pytest.raises(
        tensorfile.FormatError, match="bool tensor 'm' holds bytes other than 0 and 1"
    ):
        tdcp.dcp_to_state_dict(d)
