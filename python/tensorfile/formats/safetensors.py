"""safetensors files: a strict reader (8-byte header length, JSON header, packed data) and
the header writer behind `tensorfile.save_safetensors`.

The reader accepts what the safetensors specification allows and nothing more: a JSON
object of tensor entries and an optional "__metadata__" of str -> str, dtypes it knows,
shapes of non-negative ints, byte ranges that tile the data section exactly, in order,
with no gap, overlap or trailing byte. Unlike safetensors 0.8 it refuses duplicate names.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from .._errors import FormatError
from .._safejson import loads as safe_loads
from . import Layout, TensorRow

MAX_HEADER_NBYTES = 100 << 20  # the limit safetensors itself enforces
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep: {name: {"shape": [...]}}
MAX_INDEX = 2**63 - 1  # shapes and offsets are int64 in torch and numpy
_LEN = struct.Struct("<Q")

# safetensors dtype name -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}
NAME_OF: dict[str, str] = {torch_name: st for st, (torch_name, _) in DTYPES.items()}
# numpy arrays can be written too; these names match numpy dtype names
_NUMPY_OK = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
_NUMPY_OK |= {"float16", "float32", "float64", "complex64"}


def looks_like(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise FormatError(f"duplicate name {k!r:.80} in the header")
            seen.add(k)
    return out


def parse(
    prefix: bytes, read: Any, file_nbytes: int | None, name: str, as_numpy: bool = False
) -> Layout:
    """Validates a safetensors file whose first bytes are `prefix`; `read(nbytes, offset)`
    reads more. Returns a Layout whose tensors are one storage each, in file order, and
    whose tree is a flat dict (a str-keyed dict node per the native tree grammar); with
    `as_numpy` (no torch here) the rows are numpy rows."""

    def bad(message: str) -> FormatError:
        return FormatError(f"{name}: invalid safetensors file: {message}")

    if len(prefix) < 8:
        raise bad("shorter than the 8-byte header length")
    (hlen,) = _LEN.unpack_from(prefix)
    if hlen > MAX_HEADER_NBYTES:
        raise bad(f"header of {hlen} bytes exceeds the {MAX_HEADER_NBYTES}-byte limit")
    if file_nbytes is not None and 8 + hlen > file_nbytes:
        raise bad(f"header of {hlen} bytes runs past the end of the {file_nbytes}-byte file")
    raw = read(hlen, 8)
    if len(raw) != hlen:
        raise bad("the file ends inside its header (truncated)")
    header = safe_loads(
        raw,
        name=f"{name}: invalid safetensors file: header",
        max_depth=MAX_JSON_DEPTH,
        object_pairs_hook=_pairs,
    )
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    if not raw.startswith(b"{"):
        raise bad("header must start with '{'")
    metadata: dict[str, str] = {}
    entries: list[tuple[int, int, str, str, list[int]]] = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(type(v) is str for v in info.values()):
                raise bad("__metadata__ must be an object of strings")
            metadata = info
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r:.80} must have exactly dtype, shape and data_offsets")
        dt = DTYPES.get(info["dtype"]) if type(info["dtype"]) is str else None
        if dt is None:
            raise bad(f"tensor {key!r:.80} has unsupported dtype {info['dtype']!r:.40}")
        shape = info["shape"]
        if type(shape) is not list or not all(
            type(d) is int and 0 <= d <= MAX_INDEX for d in shape
        ):
            raise bad(f"tensor {key!r:.80} has an invalid shape")
        # its strides are products of the sizes, zeros or not (torch multiplies them out too)
        if math.prod(filter(None, shape)) > MAX_INDEX:
            raise bad(f"tensor {key!r:.80} has shape {shape}, too large for int64 strides")
        offs = info["data_offsets"]
        if (
            type(offs) is not list
            or len(offs) != 2
            or not all(type(o) is int and 0 <= o < 2**63 for o in offs)
            or offs[0] > offs[1]
        ):
            raise bad(f"tensor {key!r:.80} has invalid data_offsets")
        want = math.prod(shape) * dt[1]
        if offs[1] - offs[0] != want:
            raise bad(
                f"tensor {key!r:.80} spans {offs[1] - offs[0]} bytes but its dtype and shape need {want}"
            )
        entries.append((offs[0], offs[1], key, dt[0], shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, key, _, _ in entries:
        if begin != cursor:
            what = "a gap" if begin > cursor else "an overlap"
            raise bad(f"{what} before tensor {key!r:.80} (byte {begin}, expected {cursor})")
        cursor = end
    data = 8 + hlen
    if file_nbytes is not None and data + cursor != file_nbytes:
        what = "truncated" if data + cursor > file_nbytes else "followed by trailing bytes"
        raise bad(
            f"the data ends at byte {data + cursor} but the file is {file_nbytes} bytes: {what}"
        )
    n = len(entries)
    tensors: list[TensorRow] = []
    tree: list[Any] = ["dict"]
    kind = "numpy" if as_numpy else "torch"
    for i, (_begin, _end, key, dtype, shape) in enumerate(entries):
        if as_numpy and not numpy_supported(dtype):
            raise ImportError(f"{name} holds {dtype} tensors: install torch to load it")
        strides = []
        step = np.dtype(dtype).itemsize if as_numpy else 1  # numpy strides are in bytes
        for d in reversed(shape):
            strides.append(step)
            step *= max(d, 1)
        strides.reverse()
        tensors.append(TensorRow(kind, i, dtype, shape, strides, 0, 0))
        tree += [key, ["tensor", i]]
    return Layout(
        tree=tree,
        tensors=tensors,
        storage_kind=[kind] * n,
        storage_device=["cpu"] * n,
        storage_nbytes=np.array([e[1] - e[0] for e in entries], dtype=np.uint64),
        storage_offsets=np.array([data + e[0] for e in entries], dtype=np.uint64),
        storage_crcs=np.zeros(n, dtype=np.uint32),
        storage_tensors=[[i] for i in range(n)],
        metadata=metadata,
        header_end=data,
        file_nbytes=data + cursor,
        minor=0,
        format="safetensors",
        crc_kind="none",
        canonical_gaps=False,
        header_nbytes=hlen,
    )


def encode_header(
    entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """entries: (name, torch dtype name, shape, nbytes) in file order. Returns the 8-byte
    length plus the JSON header padded with spaces to a multiple of 8 (as safetensors
    writes it), and each tensor's offset in the data section."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    cursor = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {
            "dtype": NAME_OF[dtype],
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        offsets.append(cursor)
        cursor += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return _LEN.pack(len(body)) + body, offsets


def numpy_supported(name: str) -> bool:
    return name in _NUMPY_OK
