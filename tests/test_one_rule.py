"""Each byte rule has one implementation: a flipped padding byte, a bool byte other than
0 and 1 and a damaged storage are refused with the same words on every path (pread,
stream, mmap, lazy get, verify, convert) and in every format that has the rule."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tensorfile  # noqa: E402
from tensorfile import ChecksumError, FormatError, _convert  # noqa: E402
from tensorfile._reader import open_reader  # noqa: E402


class _Pipe(io.RawIOBase):
    """A stream that cannot seek, as a pipe."""

    def __init__(self, data: bytes, name: str) -> None:
        self._b = io.BytesIO(data)
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, view) -> int:  # type: ignore[no-untyped-def]
        return self._b.readinto(view)


def _patched(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


def _load_open_file(path):
    with open(path, "rb") as f:
        return tensorfile.load(f)


def _get(path, key):
    with tensorfile.open(path) as f:
        return f.get(key)


def _paths(path, tmp_path, lazy_key=None):
    """Every way of reading the whole file, and a lazy get when `lazy_key` is given."""
    data = path.read_bytes()
    ways = {
        "pread": lambda: tensorfile.load(path),
        "seekable stream": lambda: _load_open_file(path),
        "pipe": lambda: tensorfile.load(_Pipe(data, str(path))),
        "mmap": lambda: tensorfile.load(path, mmap=True),
        "verify": lambda: _convert.verify(str(path)),
        "convert": lambda: _convert.convert(str(path), str(tmp_path / "out.tf"), "tensorfile"),
    }
    if lazy_key is not None:
        ways["get"] = lambda: _get(path, lazy_key)
    return ways


def test_a_padding_byte_is_refused_alike_on_every_path(tmp_path):
    path = tmp_path / "p.tf"
    tensorfile.save({"a": torch.arange(3, dtype=torch.int8), "b": torch.ones(5)}, path)
    with open_reader(str(path)) as r:
        lay = r.layout
        gap = int(lay.storage_offsets[0] + lay.storage_nbytes[0]) + 7  # inside the padding
        header_gap = lay.header_end + 1  # between the header and the first storage
    for where in (gap, header_gap):
        bad = tmp_path / f"bad{where}.tf"
        bad.write_bytes(path.read_bytes())
        _patched(bad, where, 0x5A)
        want = f"{bad}: padding byte at offset {where} is not zero"
        ways = _paths(bad, tmp_path)
        if where == gap:
            del ways["convert"]  # convert checks the source's checksums, not its padding
        messages = {}
        for name, way in ways.items():
            with pytest.raises(FormatError) as e:
                way()
            messages[name] = str(e.value)
        for name, msg in messages.items():
            assert msg.startswith(want), (name, msg)
        assert len({m.split(" (")[0] for m in messages.values()}) == 1, messages


def _bool_files(tmp_path):
    """One file per format holding a bool tensor whose second byte is 2, written with
    checksums of those bytes (a uint8 tensor viewed as bool: no writer checks)."""
    t = torch.tensor([1, 2, 1, 1], dtype=torch.uint8).view(torch.bool)
    out = {}
    out["tensorfile"] = tmp_path / "b.tf"
    tensorfile.save({"m": t}, out["tensorfile"])
    out["torch.save"] = tmp_path / "b.pt"
    torch.save({"m": t}, out["torch.save"])
    out["safetensors"] = tmp_path / "b.safetensors"
    tensorfile.save_safetensors({"m": t}, out["safetensors"])
    return out


def test_bool_bytes_are_refused_alike_in_every_format(tmp_path):
    files = _bool_files(tmp_path)
    for fmt, path in files.items():
        ways = {
            "load": lambda p=path: tensorfile.load(p),
            "mmap": lambda p=path: tensorfile.load(p, mmap=True),
            "get": lambda p=path: _get(p, "m"),
            "verify": lambda p=path: _convert.verify(str(p)),
        }
        for name, way in ways.items():
            with pytest.raises(
                FormatError, match=r"bool tensor 0 holds bytes other than 0 and 1"
            ) as e:
                way()
            assert str(e.value).startswith(f"{path}: "), (fmt, name, e.value)


def test_a_damaged_storage_is_refused_alike_on_every_path(tmp_path):
    src = {"w": torch.arange(1000, dtype=torch.float32)}
    for fmt in ("tensorfile", "torch.save"):
        path = tmp_path / ("d.tf" if fmt == "tensorfile" else "d.pt")
        if fmt == "tensorfile":
            tensorfile.save(src, path)
        else:
            torch.save(src, path)
        with open_reader(str(path)) as r:
            at = int(r.layout.storage_offsets[0]) + 40
        _patched(path, at, path.read_bytes()[at] ^ 0xFF)
        ways = {
            "load": lambda p=path: tensorfile.load(p),
            "mmap": lambda p=path: tensorfile.load(p, mmap=True),
            "get": lambda p=path: _get(p, "w"),
            "verify": lambda p=path: _convert.verify(str(p)),
            "convert": lambda p=path: _convert.convert(
                str(p), str(tmp_path / "o.tf"), "tensorfile"
            ),
        }
        if fmt == "tensorfile":
            ways["stream"] = lambda p=path: tensorfile.load(_Pipe(p.read_bytes(), str(p)))
        what = "checksum" if fmt == "tensorfile" else "zip CRC-32 checksum"
        want = f"{path}: storage 0 (w) {what} mismatch (file damaged after it was written)"
        for name, way in ways.items():
            with pytest.raises(ChecksumError) as e:
                way()
            assert str(e.value).startswith(want), (fmt, name, e.value)
        # and verify=False reads the damaged bytes, never the structural checks
        got = tensorfile.load(path, verify=False)["w"]
        assert not torch.equal(got, src["w"]) and got.shape == src["w"].shape


def test_numpy_bool_arrays_share_the_rule(tmp_path):
    path = tmp_path / "n.tf"
    tensorfile.save({"m": np.array([True, False])}, path)
    with open_reader(str(path)) as r:
        at = int(r.layout.storage_offsets[0])
    _patched(path, at, 3)
    with pytest.raises(FormatError, match="bool tensor 0 holds bytes other than 0 and 1"):
        tensorfile.load(path, verify=False)
