"""torch.save files (the zip format of PyTorch 1.6 and later), read without executing them.

The zip's central directory is parsed here (zip64 included) and checked: one archive
folder, no duplicate, encrypted, compressed or overlapping records. `data.pkl` is read by
a restricted unpickler that resolves only the globals torch.load(weights_only=True)
allows for plain tensors and containers, each to a stand-in of our own: tensors become
`TensorRecord`s naming a storage record, and nothing from the file is ever imported or
called. A pickle naming any other global is refused with a FormatError naming it.
Storages are then read by the engine like any other file's, and each record's zip CRC-32
is checked (torch.load ignores it).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._dtypes import TORCH_ITEMSIZE
from .._errors import FormatError
from .._layout import FLAG_PARAMETER, FLAG_REQUIRES_GRAD, Layout, TensorRow

MAX_PICKLE_NBYTES = 1 << 30
MAX_DEPTH = 200
MAX_NDIM = 64

_EOCD = struct.Struct("<IHHHHIIH")  # signature .. comment length (22 bytes)
_EOCD64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes

# Legacy typed storage classes named in torch.save pickles -> element dtype.
_STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "UntypedStorage": "uint8",
}
_QUANTIZED_STORAGES = {
    "QInt8Storage",
    "QInt32Storage",
    "QUInt8Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
}


def looks_like(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


@dataclass
class ZipRecord:
    name: str
    data_offset: int
    nbytes: int
    crc32: int
    compressed: bool
    compressed_nbytes: int


class _Inert:
    """Base of the stand-ins the unpickler hands to the pickle: slotted, and a BUILD
    opcode aimed at one (to rewrite its fields) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"the pickle tries to set state on a {type(self).__name__}")


class StorageType(_Inert):
    """What a `torch.FloatStorage`-like global resolves to: only its element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _TypeMarker(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_TENSOR = _TypeMarker("torch.Tensor")
_PARAMETER = _TypeMarker("torch.nn.Parameter")


class TypedRef(_Inert):
    """What a persistent id resolves to: a storage seen with an element type."""

    __slots__ = ("dtype", "numel", "ref")

    def __init__(self, ref: StorageRef, dtype: str, numel: int) -> None:
        self.ref = ref
        self.dtype = dtype
        self.numel = numel


class StorageRef(_Inert):
    """A storage named by a persistent id: ('storage', type, key, location, numel)."""

    __slots__ = ("dtype", "index", "key", "location", "numel")

    def __init__(self, dtype: str, key: str, location: str, numel: int, index: int) -> None:
        self.dtype = dtype
        self.key = key
        self.location = location
        self.numel = numel
        self.index = index


class TensorRecord(_Inert):
    """A tensor as the pickle describes it; turned into a real tensor once its storage is read."""

    __slots__ = (
        "dtype",
        "index",
        "meta",
        "offset",
        "parameter",
        "requires_grad",
        "shape",
        "storage",
        "strides",
    )

    def __init__(
        self,
        storage: StorageRef,
        dtype: str,
        offset: int,
        shape: list[int],
        strides: list[int],
        requires_grad: bool,
        meta: dict[str, bool],
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.requires_grad = requires_grad
        self.parameter = False
        self.index = -1
        self.meta = meta


@dataclass
class TorchArchive:
    """A validated torch.save zip: the object graph with TensorRecord leaves."""

    root: Any
    records: list[TensorRecord]  # in pickle order; record.index is the position
    storages: list[StorageRef]  # in first-use order; StorageRef.index is the position
    storage_records: list[ZipRecord]
    prefix: str
    version: str
    file_nbytes: int
    pickle_nbytes: int


# --------------------------------------------------------------------------- zip


def _zip64_extra(extra: bytes, want: list[str], name: str) -> dict[str, int]:
    """The zip64 extended-information field: 8-byte values, present only for the central
    directory fields that hold 0xFFFFFFFF (in the order uncompressed, compressed, offset)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        if len(body) != n:
            break
        if tag == 1:
            out = {}
            for i, field in enumerate(want):
                if 8 * i + 8 > n:
                    raise FormatError(f"{name}: zip64 field of a record is too short")
                out[field] = struct.unpack_from("<Q", body, 8 * i)[0]
            return out
        pos += 4 + n
    if want:
        raise FormatError(f"{name}: a zip record needs a zip64 field but has none")
    return {}


def _read_each(read: Any, offsets: list[int], sizes: list[int]) -> bytes:
    return b"".join(read(n, o) for o, n in zip(offsets, sizes))


def read_directory(
    read: Any, file_nbytes: int, name: str, read_many: Any = None
) -> list[ZipRecord]:
    """Parses and checks the central directory. `read(nbytes, offset)` reads the file;
    `read_many(offsets, sizes)` reads many sorted, disjoint ranges into one bytes object
    (by default one `read` each)."""

    def bad(message: str) -> FormatError:
        return FormatError(f"{name}: invalid torch.save zip file: {message}")

    tail_nbytes = min(file_nbytes, 22 + 65535 + 20)
    tail = read(tail_nbytes, file_nbytes - tail_nbytes)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (
        at + 22 > len(tail) or at + 22 + _EOCD.unpack_from(tail, at)[7] != len(tail)
    ):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise bad("no end-of-central-directory record (truncated or not a zip)")
    _, disk, cd_disk, n_here, n_total, cd_nbytes, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_offset = file_nbytes - tail_nbytes + at
    if 0xFFFF in (n_here, n_total) or 0xFFFFFFFF in (cd_nbytes, cd_offset):
        if at < 20:
            raise bad("zip64 end-of-central-directory locator missing")
        sig, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(tail, at - 20)
        if sig != 0x07064B50 or eocd64_offset + 56 > eocd_offset:
            raise bad("bad zip64 end-of-central-directory locator")
        raw = read(56, eocd64_offset)
        if len(raw) != 56:
            raise bad("truncated zip64 end-of-central-directory record")
        sig, _, _, _, disk, cd_disk, n_here, n_total, cd_nbytes, cd_offset = _EOCD64.unpack(raw)
        if sig != 0x06064B50:
            raise bad("bad zip64 end-of-central-directory record")
        eocd_offset = eocd64_offset
    if disk != 0 or cd_disk != 0 or n_here != n_total:
        raise bad("multi-part zip archives are not supported")
    if cd_offset + cd_nbytes > eocd_offset:
        raise bad("the central directory runs past its end record")
    cd = read(cd_nbytes, cd_offset)
    if len(cd) != cd_nbytes:
        raise bad("truncated central directory")
    out: list[ZipRecord] = []
    pos = 0
    locals_at: list[int] = []
    for _ in range(n_total):
        if pos + 46 > len(cd):
            raise bad("the central directory is shorter than its entry count")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, loc) = (
            _CENTRAL.unpack_from(cd, pos)
        )
        if sig != 0x02014B50:
            raise bad(f"bad central directory entry at offset {cd_offset + pos}")
        end = pos + 46 + nlen + elen + clen
        if end > len(cd):
            raise bad("a central directory entry runs past the directory")
        try:
            rname = cd[pos + 46 : pos + 46 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            raise bad("a record name is not UTF-8") from None
        want = [f for f, v in (("u", usize), ("c", csize), ("o", loc)) if v == 0xFFFFFFFF]
        if want:
            big = _zip64_extra(cd[pos + 46 + nlen : pos + 46 + nlen + elen], want, name)
            usize, csize, loc = big.get("u", usize), big.get("c", csize), big.get("o", loc)
        if flags & 1:
            raise bad(f"record {rname!r} is encrypted")
        if method not in (0, 8):
            raise bad(f"record {rname!r} uses unsupported compression method {method}")
        if method == 0 and csize != usize:
            raise bad(f"stored record {rname!r} has different compressed and plain sizes")
        out.append(ZipRecord(rname, 0, usize, crc, method == 8, csize))
        locals_at.append(loc)
        pos = end
    if pos != len(cd):
        raise bad("trailing bytes in the central directory")
    # Local headers: their name and extra lengths give where each record's data starts.
    # Each is read with the name it should carry, all in one batch of sorted ranges.
    order = sorted(range(len(out)), key=locals_at.__getitem__)
    names = [r.name.encode("utf-8") for r in out]
    sizes = [30 + len(names[i]) for i in order]
    offsets = [locals_at[i] for i in order]
    for k in range(len(order) - 1):
        if offsets[k] + sizes[k] > offsets[k + 1]:
            raise bad(f"records {out[order[k]].name!r} and {out[order[k + 1]].name!r} overlap")
    if order and offsets[-1] + sizes[-1] > file_nbytes:
        raise bad(f"record {out[order[-1]].name!r} points past the end of the file")
    heads = (read_many or (lambda o, n: _read_each(read, o, n)))(offsets, sizes)
    if len(heads) != sum(sizes):
        raise bad("a local header points past the end of the file")
    at = 0
    for i, size in zip(order, sizes):
        rec = out[i]
        sig, _, _, _, _, _, _, _, _, nlen, elen = _LOCAL.unpack_from(heads, at)
        if sig != 0x04034B50:
            raise bad(f"record {rec.name!r} has no local header at offset {locals_at[i]}")
        if nlen != len(names[i]) or heads[at + 30 : at + size] != names[i]:
            raise bad(f"record {rec.name!r}: local and central names differ")
        rec.data_offset = locals_at[i] + size + elen
        at += size
    spans = sorted((r.data_offset, r.data_offset + r.compressed_nbytes, r.name) for r in out)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"records {n0!r} and {n1!r} overlap")
    if spans and spans[-1][1] > cd_offset:
        raise bad(f"record {spans[-1][2]!r} runs into the central directory")
    return out


# --------------------------------------------------------------------------- pickle


def _refuse(module: str, qualname: str) -> FormatError:
    return FormatError(
        f"the pickle names the global {module}.{qualname}, which tensorfile does not load "
        "(only tensors, Parameters, containers and plain values, as torch.load(weights_only=True)); "
        "it was not imported or called"
    )


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise FormatError("_codecs.encode is allowed only for latin-1 bytes")
    return text.encode("latin1")


def _bytearray(*args: Any) -> bytearray:
    if len(args) == 0:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0].encode("latin1"))
    raise FormatError("bytearray may be built only from bytes")


def _set(items: Any = ()) -> set[Any]:
    if type(items) is not list and type(items) is not tuple:
        raise FormatError("set may be built only from a list")
    return set(items)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise FormatError("complex may be built only from two numbers")
    return complex(real, imag)


def _int_list(x: Any, what: str) -> list[int]:
    if type(x) not in (tuple, list) and type(x).__name__ != "Size":
        raise FormatError(f"tensor {what} must be a tuple of ints")
    out = list(x)
    if len(out) > MAX_NDIM or not all(type(d) is int and 0 <= d < 2**62 for d in out):
        raise FormatError(f"tensor {what} must be at most {MAX_NDIM} non-negative ints")
    return out


def _check_meta(metadata: Any) -> dict[str, bool]:
    if metadata is None or metadata == {}:
        return {}
    if (
        not isinstance(metadata, dict)
        or not set(metadata) <= {"conj", "neg"}
        or not all(type(v) is bool for v in metadata.values())
    ):
        raise FormatError("tensor metadata may only hold the conj and neg flags")
    return {k: v for k, v in metadata.items() if v}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, torch: Any, storage_names: set[str]) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.torch = torch
        self.storage_names = storage_names
        self.storages: dict[str, StorageRef] = {}
        self.storage_list: list[StorageRef] = []
        self.records: list[TensorRecord] = []
        allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("collections", "Counter"): collections.Counter,
            ("builtins", "set"): _set,
            ("builtins", "bytearray"): _bytearray,
            ("builtins", "complex"): _complex,
            ("_codecs", "encode"): _encode,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_v3,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_v1,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type,
        }
        if torch is not None:
            allowed[("torch", "Size")] = torch.Size
            allowed[("torch", "device")] = torch.device
        # Named only as _rebuild_from_type_v2's type argument: markers, never callables
        # (torch.Tensor(n) would allocate n elements).
        allowed[("torch", "Tensor")] = _TENSOR
        allowed[("torch._tensor", "Tensor")] = _TENSOR
        allowed[("torch.nn.parameter", "Parameter")] = _PARAMETER
        self.allowed = allowed

    # globals -----------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.tensor":  # renamed in PyTorch 1.8, as torch.load maps it
            module = "torch._tensor"
        elif module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            module = "builtins"
        got = self.allowed.get((module, name))
        if got is not None:
            return got
        if module in ("torch", "torch.storage", "torch.cuda"):
            if name in _STORAGE_TYPES:
                return StorageType(_STORAGE_TYPES[name])
            if name in _QUANTIZED_STORAGES:
                raise FormatError(f"quantized storages ({name}) are not supported")
            if module == "torch" and name in TORCH_ITEMSIZE and self.torch is not None:
                return getattr(self.torch, name)
        raise _refuse(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise FormatError("the pickle holds a persistent id that is not a storage reference")
        _, stype, key, location, numel = pid
        if not isinstance(stype, StorageType):
            raise FormatError("a storage reference names no storage type")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise FormatError("a storage reference is malformed")
        ref = self.storages.get(key)
        if ref is None:
            if key not in self.storage_names:
                raise FormatError(f"the pickle refers to storage {key!r}, which has no data record")
            ref = StorageRef(stype.dtype, key, location, numel, len(self.storage_list))
            self.storages[key] = ref
            self.storage_list.append(ref)
        elif ref.location != location:
            raise FormatError(f"storage {key!r} is referred to with two locations")
        return TypedRef(ref, stype.dtype, numel)

    # rebuild functions ---------------------------------------------------------
    def _record(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        dtype: str | None,
        metadata: Any,
    ) -> TensorRecord:
        if type(storage) is not TypedRef:
            raise FormatError("a tensor is rebuilt from something that is not a storage")
        ref = storage.ref
        dtype = storage.dtype if dtype is None else dtype
        if dtype not in TORCH_ITEMSIZE:
            raise FormatError(f"tensor dtype {dtype} is not supported")
        if type(offset) is not int or offset < 0:
            raise FormatError("a tensor's storage offset must be a non-negative int")
        shape = _int_list(size, "shape")
        strides = _int_list(stride, "strides")
        if len(shape) != len(strides):
            raise FormatError("a tensor's shape and strides differ in length")
        if math.prod(shape) >= 2**62:  # zero strides keep a huge shape inside a tiny storage
            raise FormatError(f"a tensor's shape {shape} has more elements than any tensor can")
        if type(requires_grad) is not bool:
            raise FormatError("a tensor's requires_grad must be a bool")
        rec = TensorRecord(ref, dtype, offset, shape, strides, requires_grad, _check_meta(metadata))
        # the storage's typed numel is checked against its record's size later
        rec.index = len(self.records)
        self.records.append(rec)
        return rec

    def _rebuild_v1(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRecord:
        return self._record(storage, offset, size, stride, False, None, None)

    def _rebuild_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        metadata: Any = None,
    ) -> TensorRecord:
        return self._record(storage, offset, size, stride, requires_grad, None, metadata)

    def _rebuild_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> TensorRecord:
        torch = self.torch
        if torch is None or not isinstance(dtype, torch.dtype):
            raise FormatError("_rebuild_tensor_v3 needs a dtype")
        return self._record(
            storage,
            offset,
            size,
            stride,
            requires_grad,
            str(dtype).removeprefix("torch."),
            metadata,
        )

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any, hooks: Any, state: Any = None
    ) -> TensorRecord:
        if not isinstance(data, TensorRecord) or type(requires_grad) is not bool:
            raise FormatError("a Parameter is rebuilt from something that is not a tensor")
        data.parameter = True
        data.requires_grad = requires_grad
        return data

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> TensorRecord:
        if func not in (
            self._rebuild_v2,
            self._rebuild_v3,
            self._rebuild_v1,
            self._rebuild_parameter,
        ):
            raise FormatError("_rebuild_from_type_v2 names a function that is not a tensor rebuild")
        if new_type is not _TENSOR and new_type is not _PARAMETER:
            raise FormatError("tensor subclasses are not supported")
        if type(args) is not tuple:
            raise FormatError("_rebuild_from_type_v2 arguments must be a tuple")
        rec = func(*args)
        if new_type is _PARAMETER:
            rec.parameter = True
        return rec


def unpickle(
    data: bytes, torch: Any, storage_names: set[str], name: str
) -> tuple[Any, list[TensorRecord], list[StorageRef]]:
    if torch is None:
        raise ImportError(f"{name} is a torch.save file: install torch to load it")
    up = _Unpickler(data, torch, storage_names)
    try:
        root = up.load()
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    except Exception as e:  # hostile bytes must end in a FormatError, whatever they break
        raise FormatError(
            f"{name}: data.pkl is not a valid torch.save pickle ({type(e).__name__}: {e})"
        ) from None
    return root, up.records, up.storage_list


def open_archive(
    read: Any, file_nbytes: int, torch: Any, name: str, read_many: Any = None
) -> TorchArchive:
    """Parses the zip and the pickle; checks every tensor against its storage record."""
    records = read_directory(read, file_nbytes, name, read_many)
    if not records:
        raise FormatError(f"{name}: invalid torch.save zip file: the archive is empty")
    prefix = records[0].name.split("/", 1)[0]
    by_name: dict[str, ZipRecord] = {}
    for r in records:
        if not r.name.startswith(prefix + "/"):
            raise FormatError(
                f"{name}: invalid torch.save zip file: record {r.name!r} is outside {prefix}/"
            )
        if r.name in by_name:
            raise FormatError(f"{name}: invalid torch.save zip file: duplicate record {r.name!r}")
        by_name[r.name] = r
    pkl = by_name.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise FormatError(f"{name}: invalid torch.save zip file: no {prefix}/data.pkl record")
    order = by_name.get(f"{prefix}/byteorder")
    if order is not None and _record_bytes(read, order, name, 16) != b"little":
        raise FormatError(f"{name}: big-endian torch.save files are not supported")
    version_rec = by_name.get(f"{prefix}/version") or by_name.get(f"{prefix}/.data/version")
    version = (
        _record_bytes(read, version_rec, name, 64).decode("ascii", "replace").strip()
        if version_rec
        else ""
    )
    data = _record_bytes(read, pkl, name, MAX_PICKLE_NBYTES)
    dprefix = f"{prefix}/data/"
    storage_names = {r.name[len(dprefix) :] for r in records if r.name.startswith(dprefix)}
    root, tensors, storages = unpickle(data, torch, storage_names, name)
    storage_records = []
    for ref in storages:
        rec = by_name[dprefix + ref.key]
        if rec.compressed:
            raise FormatError(
                f"{name}: storage record {rec.name!r} is compressed (torch.save never does this)"
            )
        want = ref.numel * TORCH_ITEMSIZE[ref.dtype]
        if rec.nbytes != want:
            raise FormatError(
                f"{name}: storage {ref.key!r} holds {rec.nbytes} bytes but its pickle entry needs {want}"
            )
        storage_records.append(rec)
    for t in tensors:
        nbytes = storage_records[t.storage.index].nbytes
        itemsize = TORCH_ITEMSIZE[t.dtype]
        if 0 in t.shape:
            continue
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.strides))
        if (last + 1) * itemsize > nbytes:
            raise FormatError(
                f"{name}: a tensor of shape {t.shape} reaches byte {(last + 1) * itemsize} of storage "
                f"{t.storage.key!r}, which holds {nbytes}"
            )
    return TorchArchive(
        root, tensors, storages, storage_records, prefix, version, file_nbytes, len(data)
    )


def _record_bytes(read: Any, rec: ZipRecord, name: str, limit: int) -> bytes:
    if rec.compressed_nbytes > limit or rec.nbytes > limit:
        raise FormatError(f"{name}: record {rec.name!r} is larger than the {limit}-byte limit")
    raw = read(rec.compressed_nbytes, rec.data_offset)
    if len(raw) != rec.compressed_nbytes:
        raise FormatError(f"{name}: record {rec.name!r} is truncated")
    if rec.compressed:
        try:
            d = zlib.decompressobj(-15)
            raw = d.decompress(raw, limit + 1)
        except zlib.error as e:
            raise FormatError(f"{name}: record {rec.name!r} does not decompress: {e}") from None
    if len(raw) != rec.nbytes:
        raise FormatError(f"{name}: record {rec.name!r} has the wrong size")
    if zlib.crc32(raw) != rec.crc32 and rec.crc32 != 0:
        raise FormatError(f"{name}: record {rec.name!r} fails its zip CRC-32 check (damaged)")
    return raw


# --------------------------------------------------------------------------- object graph


def walk_records(root: Any, visit_key: Any = None) -> None:
    """Calls visit_key(path, record) for each tensor record reachable through dicts,
    lists and tuples, in order; raises FormatError past MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    seen: set[int] = set()
    while stack:
        node, prefix, depth = stack.pop()
        if isinstance(node, TensorRecord):
            visit_key(prefix, node)
            continue
        if depth > MAX_DEPTH:
            raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            items = [(str(k), v) for k, v in node.items()]
        elif type(node) in (list, tuple):
            items = [(str(i), v) for i, v in enumerate(node)]
        else:
            continue
        if id(node) in seen and isinstance(node, (dict, list)):
            continue  # shared or cyclic containers are listed once
        seen.add(id(node))
        stack.extend((v, f"{prefix}.{k}" if prefix else k, depth + 1) for k, v in reversed(items))


def substitute(root: Any, tensors: list[Any]) -> Any:
    """Replaces every TensorRecord in the graph by tensors[record.index], in place for
    dicts and lists, rebuilding tuples. Cycles through tuples holding tensors are refused."""
    done: dict[int, Any] = {}
    active: set[int] = set()

    def fix(node: Any, depth: int) -> Any:
        if isinstance(node, TensorRecord):
            return tensors[node.index]
        if isinstance(node, TypedRef):
            raise FormatError("bare storages (not tensors) are not supported")
        t = type(node)
        if not (isinstance(node, (dict, list)) or t is tuple or t in (set, frozenset)):
            return node
        key = id(node)
        if key in done:
            return done[key]
        if depth > MAX_DEPTH:
            raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            done[key] = node
            for k in list(node):
                if isinstance(k, TensorRecord):
                    raise FormatError("a tensor used as a dict key is not supported")
                v = node[k]
                nv = fix(v, depth + 1)
                if nv is not v:
                    node[k] = nv
            attrs = getattr(node, "__dict__", None)
            if attrs:
                for k, v in list(attrs.items()):
                    attrs[k] = fix(v, depth + 1)
            return node
        if isinstance(node, list):
            done[key] = node
            for i, v in enumerate(node):
                nv = fix(v, depth + 1)
                if nv is not v:
                    node[i] = nv
            return node
        if t in (set, frozenset):
            if any(isinstance(v, TensorRecord) for v in node):
                raise FormatError("tensors inside a set are not supported")
            done[key] = node
            return node
        if key in active:
            raise FormatError("a tuple that contains itself is not supported")
        active.add(key)
        items = [fix(v, depth + 1) for v in node]
        active.discard(key)
        out = node if all(a is b for a, b in zip(items, node)) else tuple(items)
        done[key] = out
        return out

    return fix(root, 0)


def storage_table(archive: TorchArchive) -> dict[str, np.ndarray]:
    return {
        "offsets": np.array([r.data_offset for r in archive.storage_records], dtype=np.uint64),
        "nbytes": np.array([r.nbytes for r in archive.storage_records], dtype=np.uint64),
        "crc32": np.array([r.crc32 for r in archive.storage_records], dtype=np.uint32),
    }


def layout(archive: TorchArchive, torch: Any, name: str, file_nbytes: int) -> Layout:
    """The archive as a trusted Layout: one tensor row per record, one storage per
    storage record, the zip CRC-32s as the stored checksums."""
    rows: list[TensorRow] = []
    storage_tensors: list[list[int]] = [[] for _ in archive.storages]
    for rec in archive.records:
        flags = (FLAG_REQUIRES_GRAD if rec.requires_grad else 0) | (
            FLAG_PARAMETER if rec.parameter else 0
        )
        itemsize = TORCH_ITEMSIZE[rec.dtype]
        rows.append(
            TensorRow(
                "torch",
                rec.storage.index,
                rec.dtype,
                rec.shape,
                rec.strides,
                rec.offset * itemsize,
                flags,
            )
        )
        storage_tensors[rec.storage.index].append(rec.index)
    devices = []
    for ref in archive.storages:
        try:
            devices.append(str(torch.device(ref.location)))
        except RuntimeError:
            raise FormatError(
                f"{name}: storage {ref.key!r} has an invalid location {ref.location!r}"
            ) from None
    table = storage_table(archive)
    return Layout(
        tree=None,
        tensors=rows,
        storage_kind=["torch"] * len(archive.storages),
        storage_device=devices,
        storage_nbytes=table["nbytes"],
        storage_offsets=table["offsets"],
        storage_crcs=table["crc32"],
        storage_tensors=storage_tensors,
        metadata={},
        header_end=0,
        file_nbytes=file_nbytes,
        minor=0,
        format="torch.save",
        crc_kind="crc32",
        canonical_gaps=False,
        version=archive.version,
        header_nbytes=archive.pickle_nbytes,
        archive=archive,
    )
