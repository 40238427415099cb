"""Hostile and damaged files beyond single-rule violations: mutated valid files, huge
headers, files that change under a reader, and concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorfile.formats import native


def _original() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 40, generator=g)
    return {
        "w": base,
        "wt": base.t(),
        "small": [torch.arange(5), torch.ones(3, dtype=torch.bool)],
        "np": np.arange(6, dtype=np.int16),
        "big": torch.randn(70_000, generator=g),  # > 256 KiB: the chunked read path
        "meta": (1, "two", 3.0),
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.stride() == b.stride()
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("mut") / "valid.tf"
    tensorfile.save(_original(), path)
    return path.read_bytes()


def _mutants():
    flip = st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 7))
    cut = st.tuples(st.just("truncate"), st.integers(0, 2**31), st.just(0))
    insert = st.tuples(st.just("insert"), st.integers(0, 2**31), st.integers(1, 255))
    splice = st.tuples(st.just("splice"), st.integers(0, 2**31), st.integers(0, 2**31))
    return st.lists(st.one_of(flip, cut, insert, splice), min_size=1, max_size=3)


def _apply(data: bytes, other: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, a, b in ops:
        if not buf:
            break
        i = a % len(buf)
        if op == "flip":
            buf[i] ^= 1 << b
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = bytes([b])
        else:  # splice: our head, then the other file's tail
            buf = buf[:i] + other[b % len(other) :]
    return bytes(buf)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_mutants())
def test_every_mutant_loads_equal_or_raises_format_error(valid_bytes, tmp_path, ops):
    other_path = tmp_path / "other.tf"
    other = {"x": torch.zeros(9), "y": [1, 2]}
    if not other_path.exists():
        tensorfile.save(other, other_path)
    mutant = _apply(valid_bytes, other_path.read_bytes(), ops)
    path = tmp_path / "mutant.tf"
    path.write_bytes(mutant)
    try:
        got = tensorfile.load(path)
    except tensorfile.FormatError:
        return
    # A splice at offset 0 is the other file whole, which is valid and must load as itself.
    assert _equal(_original(), got) or _equal(other, got), "a damaged file loaded as different data"


def test_header_with_millions_of_keys_is_bounded(tmp_path):
    """A 3-million-key header (about 40 MB, under the 64 MiB cap) loads in a child
    process whose memory stays bounded; over the cap it is refused before parsing."""
    keys = 3_000_000
    tree = ["dict", *[x for i in range(keys) for x in (f"k{i}", 0)]]
    header = json.dumps(
        {"tree": tree, "tensors": [], "storages": [], "metadata": {}, "crc32c": ""},
        separators=(",", ":"),
    ).encode()
    assert len(header) < native.MAX_HEADER_NBYTES
    path = tmp_path / "many.tf"
    path.write_bytes(native.make_preamble(header, native.PREAMBLE_NBYTES + len(header)) + header)
    code = textwrap.dedent(
        f"""
        import resource, tensorfile
        obj = tensorfile.load({str(path)!r})
        assert len(obj) == {keys}
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mib < 2048, f"peak RSS {peak_mib} MiB for a {len(header) >> 20} MiB header"


def test_file_truncated_under_a_reader_raises(tmp_path):
    """The pread path notices a file that shrinks after its header was read."""
    path = tmp_path / "t.tf"
    tensorfile.save({"a": torch.ones(100_000), "b": torch.zeros(10)}, path)
    with tensorfile.open(path) as r:
        os.truncate(path, 5000)
        with pytest.raises(tensorfile.FormatError, match="unexpected end of file"):
            r.get("a")
        with pytest.raises(tensorfile.FormatError, match=r"t\.tf"):
            r.load()


WRITER = textwrap.dedent(
    """
    import sys, torch, tensorfile
    path, v = sys.argv[1], int(sys.argv[2])
    for _ in range(6):
        tensorfile.save({"v": v, "t": torch.full((300_000,), float(v))}, path)
    """
)

READER = textwrap.dedent(
    """
    import sys, os, torch, tensorfile
    path = sys.argv[1]
    seen = set()
    for _ in range(150):
        obj = tensorfile.load(path)
        v = obj["v"]
        assert bool(obj["t"].eq(float(v)).all()), "a mixed file was read"
        seen.add(v)
    print(sorted(seen))
    """
)


def test_concurrent_writers_and_a_reader(tmp_path):
    path = str(tmp_path / "shared.tf")
    tensorfile.save({"v": 0, "t": torch.full((300_000,), 0.0)}, path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(v)]) for v in (1, 2, 3)]
    reader = subprocess.run(
        [sys.executable, "-c", READER, path], capture_output=True, text=True, check=False
    )
    for w in writers:
        assert w.wait(timeout=300) == 0
    assert reader.returncode == 0, reader.stderr[-2000:]
    obj = tensorfile.load(path)
    assert obj["v"] in (1, 2, 3) and bool(obj["t"].eq(float(obj["v"])).all())
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tftmp")] == []
