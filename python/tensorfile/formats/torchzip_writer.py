"""torch.save files written without torch.save: the zip layout that torch.load (PyTorch 1.6
and later, weights_only=True included) reads, for `tensorfile convert ... model.pt`.

The archive holds, under one folder (`archive/`), `data.pkl` (the object graph, pickled at
protocol 2 as torch.save pickles it: each tensor is a `torch._utils._rebuild_tensor_v2`
call, or `_rebuild_tensor_v3` for dtypes without a legacy storage class, over a
persistent id `("storage", storage class, key, location, numel)`), `byteorder`
("little"), one `data/KEY` record per storage, and `version` ("3"). Records are stored
uncompressed, each one's data 64-byte aligned by a padding extra field (miniz's "FB"
field, as torch.save pads), with its zip CRC-32 and sizes in the local header, and zip64
fields wherever a size or offset needs them. `.format_version` is left out on purpose:
with it torch.load may compute storage offsets assuming miniz's exact record layout
(data descriptors included) instead of reading them from the directory.

This module only encodes: the caller streams each storage's bytes to `data_offsets[j]`
and writes the headers once the CRC-32s are known.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._dtypes import TORCH_ITEMSIZE

PREFIX = "archive"
ALIGN = 64  # torch.save's storage alignment (mmap-friendly)
VERSION = b"3\n"  # the archive format version torch 2.x writes
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields
_PAD_TAG = 0x4246  # "FB"

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_LOCATOR = struct.Struct("<IIQI")  # 20 bytes

# dtype name -> the legacy storage class torch.save names for tensors of that dtype
# (torch.storage._dtype_to_storage_type_map, without the quantized ones); tensors of
# other dtypes are pickled over an UntypedStorage with _rebuild_tensor_v3, as torch does.
STORAGE_CLASS = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "bfloat16": "BFloat16Storage",
    "complex128": "ComplexDoubleStorage",
    "complex64": "ComplexFloatStorage",
}


# --------------------------------------------------------------------------- the pickle


@dataclass(frozen=True)
class StorageSpec:
    """One storage of the archive: `dtype` is the one element type of all its tensors
    when a legacy storage class holds it (None: an UntypedStorage)."""

    location: str  # "cpu", "cuda:0", ...
    nbytes: int
    dtype: str | None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the pickle rebuilds it; `offset` counts elements of `dtype`."""

    storage: int  # index into the storage table (its record is data/<index>)
    dtype: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False
    meta: dict[str, bool] = field(default_factory=dict)  # torch's conj / neg flags


class _StorageKey:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Data:
    """A Parameter's plain tensor (pickled inside _rebuild_parameter)."""

    __slots__ = ("spec",)

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec


class _Pickler(pickle.Pickler):
    def __init__(
        self, out: io.BytesIO, torch: Any, specs: dict[int, TensorSpec], storages: list[StorageSpec]
    ) -> None:
        super().__init__(out, protocol=2)  # torch.save's default protocol
        self.torch = torch
        self.specs = specs
        self.storages = storages
        self.keep: list[Any] = []  # stand-ins made here stay alive, so their ids stay unique

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not _StorageKey:
            return None
        st = self.storages[obj.index]
        torch = self.torch
        if st.dtype is None:
            cls, numel = torch.storage.UntypedStorage, st.nbytes
        else:
            cls = getattr(torch, STORAGE_CLASS[st.dtype])
            numel = st.nbytes // TORCH_ITEMSIZE[st.dtype]
        return ("storage", cls, str(obj.index), st.location, numel)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is _Data:
            return self._tensor(obj.spec, False)
        spec = self.specs.get(id(obj))
        if spec is None:
            return NotImplemented
        if spec.parameter:
            data = _Data(spec)
            self.keep.append(data)
            return (
                self.torch._utils._rebuild_parameter,
                (data, spec.requires_grad, collections.OrderedDict()),
            )
        return self._tensor(spec, spec.requires_grad)

    def _tensor(self, spec: TensorSpec, requires_grad: bool) -> Any:
        torch = self.torch
        key = _StorageKey(spec.storage)
        self.keep.append(key)
        args: tuple[Any, ...] = (
            key,
            spec.offset,
            spec.shape,
            spec.strides,
            requires_grad,
            collections.OrderedDict(),
        )
        if self.storages[spec.storage].dtype is None:
            args += (getattr(torch, spec.dtype),)
            fn = torch._utils._rebuild_tensor_v3
        else:
            fn = torch._utils._rebuild_tensor_v2
        if spec.meta:
            args += (dict(spec.meta),)
        return (fn, args)


def encode_pickle(
    torch: Any, graph: Any, specs: dict[int, TensorSpec], storages: list[StorageSpec]
) -> bytes:
    """data.pkl for `graph`, whose tensors are the objects whose ids key `specs`."""
    out = io.BytesIO()
    _Pickler(out, torch, specs, storages).dump(graph)
    return out.getvalue()


def loadable_tensors(torch: Any, graph: Any, is_tensor: Callable[[Any], bool]) -> list[Any]:
    """The tensors of `graph` (each once, in order), after checking that every other
    value is one torch.load(weights_only=True) rebuilds: containers (dict, OrderedDict
    and its attributes, Counter, list, tuple, set), None, bool, int, float, complex, str,
    bytes, bytearray, torch.Size, torch.device and dtypes. Raises ValueError naming the
    key path of the first that is not (a numpy value, say)."""
    plain = (type(None), bool, int, float, complex, str, bytes, bytearray)
    torch_values = (torch.Size, torch.device, torch.dtype)
    out: list[Any] = []
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(graph, "")]
    while stack:
        node, path = stack.pop()
        t = type(node)
        if is_tensor(node):
            if id(node) not in seen:
                seen.add(id(node))
                out.append(node)
            continue
        if t in plain or t in torch_values:
            continue
        if t in (dict, collections.OrderedDict, collections.Counter, list, tuple, set):
            if id(node) in seen:
                continue  # pickled once; the pickle refers back to it
            seen.add(id(node))
            if t is set:
                items = [(v, f"{path}.<set item>") for v in node]
            elif isinstance(node, dict):
                items = [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
                items += [(k, f"{path}.<key {k!r}>") for k in node]
                items += [(v, f"{path}@{k}") for k, v in getattr(node, "__dict__", {}).items()]
            else:
                items = [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
            stack.extend(reversed(items))
            continue
        raise ValueError(
            f"the value at key path {path or '<root>'!r} is a {t.__module__}.{t.__qualname__}, "
            "which torch.load(weights_only=True) does not load; convert to a tensorfile instead"
        )
    return out


# --------------------------------------------------------------------------- the zip


@dataclass
class ZipLayout:
    """Where every record goes: names, sizes, local header and data offsets, and the
    central directory's offset; `total` is the file's size."""

    names: list[bytes]
    nbytes: list[int]
    header_offsets: list[int]
    data_offsets: list[int]
    zip64: list[bool]  # the record's local header carries zip64 sizes
    cd_offset: int
    cd_nbytes: int
    total: int

    def local_header(self, j: int, crc: int) -> bytes:
        """Record j's local header, padding field included: data_offsets[j] -
        header_offsets[j] bytes."""
        name, nb = self.names[j], self.nbytes[j]
        extra = b""
        size32 = nb
        if self.zip64[j]:
            extra = struct.pack("<HHQQ", 1, 16, nb, nb)
            size32 = 0xFFFFFFFF
        fixed = self.header_offsets[j] + _LOCAL.size + len(name) + len(extra) + 4
        pad = self.data_offsets[j] - fixed
        extra += struct.pack("<HH", _PAD_TAG, pad) + b"Z" * pad
        version = 45 if self.zip64[j] else 20
        head = _LOCAL.pack(
            0x04034B50, version, 0, 0, 0, 0, crc, size32, size32, len(name), len(extra)
        )
        return head + name + extra

    def tail(self, crcs: list[int]) -> bytes:
        """The central directory and the end records (zip64 ones where needed)."""
        parts = []
        for j, name in enumerate(self.names):
            nb, at = self.nbytes[j], self.header_offsets[j]
            fields = [v for v in (nb, nb, at) if v >= ZIP64_LIMIT]
            extra = (
                struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            )
            version = 45 if fields else 20
            size32 = nb if nb < ZIP64_LIMIT else 0xFFFFFFFF
            parts.append(
                _CENTRAL.pack(
                    0x02014B50,
                    version,
                    version,
                    0,
                    0,
                    0,
                    0,
                    crcs[j],
                    size32,
                    size32,
                    len(name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    at if at < ZIP64_LIMIT else 0xFFFFFFFF,
                )
                + name
                + extra
            )
        n = len(self.names)
        end = self.cd_offset + self.cd_nbytes
        big = n >= 0xFFFF or self.cd_offset >= ZIP64_LIMIT or self.cd_nbytes >= ZIP64_LIMIT
        if big:
            parts.append(
                _EOCD64.pack(0x06064B50, 44, 45, 45, 0, 0, n, n, self.cd_nbytes, self.cd_offset)
            )
            parts.append(_LOCATOR.pack(0x07064B50, 0, end, 1))
            parts.append(_EOCD.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            parts.append(_EOCD.pack(0x06054B50, 0, 0, n, n, self.cd_nbytes, self.cd_offset, 0))
        out = b"".join(parts)
        assert len(out) == self.total - self.cd_offset
        return out


def plan_zip(names: list[str], nbytes: list[int]) -> ZipLayout:
    """Lays out stored records in the order given, each one's data aligned to ALIGN."""
    enc = [n.encode("utf-8") for n in names]
    heads, datas, z64 = [], [], []
    at = 0
    for name, nb in zip(enc, nbytes):
        big = nb >= ZIP64_LIMIT
        fixed = at + _LOCAL.size + len(name) + (20 if big else 0) + 4
        data = fixed + (-fixed) % ALIGN
        heads.append(at)
        datas.append(data)
        z64.append(big)
        at = data + nb
    cd_nbytes = 0
    for name, nb, head in zip(enc, nbytes, heads):
        fields = sum(v >= ZIP64_LIMIT for v in (nb, nb, head))
        cd_nbytes += _CENTRAL.size + len(name) + (4 + 8 * fields if fields else 0)
    n = len(enc)
    big = n >= 0xFFFF or at >= ZIP64_LIMIT or cd_nbytes >= ZIP64_LIMIT
    total = at + cd_nbytes + (_EOCD64.size + _LOCATOR.size if big else 0) + _EOCD.size
    return ZipLayout(enc, list(nbytes), heads, datas, z64, at, cd_nbytes, total)
