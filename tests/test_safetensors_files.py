"""safetensors files: read strictly (stricter than safetensors itself), written so the
real safetensors package loads them."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import tensorfile  # noqa: E402
from tensorfile import FormatError  # noqa: E402
from tensorfile.formats.safetensors import DTYPES  # noqa: E402

TORCH_DTYPES = [
    n
    for n in (v[0] for v in DTYPES.values())
    if n in {str(d).removeprefix("torch.") for d in st._TYPES.values() if d is not None}
]


def _random(name, shape=(3, 5)):
    dt = getattr(torch, name)
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dt.itemsize,), dtype=torch.uint8)
    if name == "bool":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def _bytes(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_reads_every_dtype_written_by_safetensors(tmp_path, name):
    tensors = {"a": _random(name), "scalar": _random(name, ()), "empty": _random(name, (0, 4))}
    path = tmp_path / "x.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    got = tensorfile.load(path)
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(_bytes(got[k]), _bytes(t))
    with tensorfile.open(path) as f:
        assert f.format == "safetensors" and f.metadata() == {"format": "pt"}
        assert torch.equal(_bytes(f.get("a")), _bytes(tensors["a"]))


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_written_files_load_in_safetensors(tmp_path, name):
    tensors = {"a": _random(name), "b.weight": _random(name, (7,)), "e": _random(name, (0,))}
    path = tmp_path / "w.safetensors"
    tensorfile.save_safetensors(tensors, path, metadata={"k": "v"})
    got = st.load_file(str(path))
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(_bytes(got[k]), _bytes(t))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_views_and_sharing_on_write(tmp_path):
    base = torch.arange(20.0).reshape(4, 5)
    path = tmp_path / "v.safetensors"
    other = base.clone()
    tensorfile.save_safetensors(
        {"t": base.t(), "col": other[:, 1], "neg": (-base)._neg_view()}, path, copy_shared=True
    )
    got = st.load_file(str(path))
    assert torch.equal(got["t"], base.t()) and torch.equal(got["col"], other[:, 1])
    assert torch.equal(got["neg"], base)
    with pytest.raises(ValueError, match=r"'a' and 'b' share memory.*copy_shared=True"):
        tensorfile.save_safetensors({"a": base, "b": base[1]}, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    tensorfile.save_safetensors(
        {"a": base, "b": base[1]}, tmp_path / "s.safetensors", copy_shared=True
    )
    got = st.load_file(str(tmp_path / "s.safetensors"))
    assert torch.equal(got["b"], base[1]) and torch.equal(got["a"], base)
    # disjoint slices of one storage are not shared memory
    tensorfile.save_safetensors({"x": base[0], "y": base[1]}, tmp_path / "d.safetensors")


def test_numpy_arrays_and_refusals(tmp_path):
    path = tmp_path / "n.safetensors"
    tensorfile.save_safetensors(
        {"f": np.arange(6.0).reshape(2, 3)[:, ::2], "i": np.arange(3, dtype=np.int16)}, path
    )
    got = st.load_file(str(path))
    assert torch.equal(got["f"], torch.tensor([[0.0, 2.0], [3.0, 5.0]], dtype=torch.float64))
    with pytest.raises(TypeError, match="'q'"):
        tensorfile.save_safetensors({"q": [1, 2]}, path)
    with pytest.raises(TypeError, match="not a str"):
        tensorfile.save_safetensors({1: torch.ones(1)}, path)
    with pytest.raises(TypeError, match="no dtype"):
        tensorfile.save_safetensors({"c": torch.ones(1, dtype=torch.complex128)}, path)
    assert torch.equal(
        st.load_file(str(path))["i"], torch.arange(3, dtype=torch.int16)
    )  # old file intact


def _craft(path, header, data=b"", pad=True, raw_header=None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "I8", "shape": [3], "data_offsets": [8, 11]},
}


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({**GOOD}, bytes(11) + b"x", "trailing bytes"),
        ({**GOOD}, bytes(10), "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "gap"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            bytes(8),
            "overlap|spans",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "need 12"),
        (
            {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
            bytes(8),
            "unsupported dtype",
        ),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "invalid shape"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            bytes(8),
            "invalid data_offsets",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}},
            bytes(8),
            "exactly",
        ),
        ({"__metadata__": {"k": 1}, **GOOD}, bytes(11), "__metadata__"),
        (None, b"", "not valid UTF-8 JSON"),
    ],
    ids=[
        "trailing",
        "truncated",
        "gap",
        "overlap",
        "size",
        "dtype",
        "shape",
        "offsets",
        "extra-field",
        "metadata",
        "bad-json",
    ],
)
def test_hostile_headers(tmp_path, header, data, match):
    path = _craft(
        tmp_path / "bad.safetensors", header, data, raw_header=b"{]" if header is None else None
    )
    with pytest.raises(FormatError, match=match) as e:
        tensorfile.load(path)
    assert "bad.safetensors" in str(e.value)


def test_duplicate_names_refused_though_safetensors_accepts_them(tmp_path):
    raw = (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    path = _craft(tmp_path / "dup.safetensors", None, struct.pack("<2f", 1.0, 2.0), raw_header=raw)
    try:
        loaded = st.load_file(str(path))  # safetensors 0.8 keeps one of the two silently
        assert len(loaded) == 1
    except Exception:
        pass  # a later safetensors may refuse it too
    with pytest.raises(FormatError, match="duplicate name 'a'"):
        tensorfile.load(path)


def test_header_length_is_capped_and_checked(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        tensorfile.load(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="runs past the end"):
        tensorfile.load(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{\xff}}")
    with pytest.raises(FormatError, match="UTF-8 JSON"):
        tensorfile.load(path)


def test_streams_pipes_and_mmap(tmp_path):
    tensors = {"a": torch.randn(100, 3), "b": torch.arange(9)}
    path = tmp_path / "s.safetensors"
    st.save_file(tensors, str(path))
    data = path.read_bytes()

    class Pipe(io.BytesIO):
        def seekable(self):
            return False

    for got in (
        tensorfile.load(io.BytesIO(data)),
        tensorfile.load(Pipe(data)),
        tensorfile.load(path, mmap=True),
    ):
        assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    with pytest.raises(FormatError, match="trailing"):
        tensorfile.load(Pipe(data + b"x"))


def test_bool_bytes_other_than_0_1_are_refused(tmp_path):
    path = _craft(
        tmp_path / "b.safetensors",
        {"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}},
        b"\x01\x07",
    )
    with pytest.raises(FormatError, match="bool"):
        tensorfile.load(path)


def test_loads_as_numpy_without_torch(tmp_path):
    path = tmp_path / "np.safetensors"
    st.save_file(
        {"x": torch.arange(4, dtype=torch.int32), "h": torch.ones(2, dtype=torch.float16)},
        str(path),
    )
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tensorfile\n"
        f"d = tensorfile.load({str(path)!r})\n"
        "print(type(d['x']).__name__, d['x'].tolist(), d['h'].dtype)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split("\n")[-2] == "ndarray [0, 1, 2, 3] float16"
