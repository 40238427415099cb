"""The `.metadata` of torch's FileSystemWriter: a pickle, read by a restricted unpickler
whose cost is proportional to the pickle's size, then checked field by field."""

from __future__ import annotations

import io
import math
import os
import pickle
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .._dtypes import TORCH_ITEMSIZE
from .._errors import FormatError
from ..formats.native import MAX_NDIM
from ._common import (
    MAX_DEPTH,
    MAX_METADATA_NBYTES,
    STOCK_METADATA_NAME,
    IncompleteCheckpointError,
    check_tiling,
    open_inside,
)
from ._metadata import mappings_problem

_P: Any = pickle._Unpickler  # the pure-Python unpickler: its memo is a dict, filled as used


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(_P):
    """Unpickles the `.metadata` of torch's FileSystemWriter allowing only the classes
    that file holds: DCP's metadata dataclasses, torch sizes, dtypes and layouts, paths.
    Anything else (a callable that would run code) is refused.

    Built on the pure-Python unpickler, whose memo is a dict (the C one zero-fills an
    array as large as the largest memo index a pickle names: 9 bytes can ask for 8 GiB).
    Every container and object it builds has its nesting depth recorded, and one nested
    deeper than MAX_DEPTH is refused before anything hashes or compares it (hashing a
    tuple nested a million deep overflows the C stack). The depths stay exact because a
    container may not be filled once it has been put inside another (pickle.dumps never
    does that; only self-referencing structures need it, and metadata has none)."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
        ("torch.distributed.checkpoint.planner", "LoadItemType"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict"),
    }

    dispatch: ClassVar[dict[int, Any]] = dict(_P.dispatch)

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._depth: dict[int, int] = {}  # id -> depth, for what this unpickler built
        self._nested: set[int] = set()  # ids of those already put inside another
        self._keep: list[Any] = []  # keeps them alive, so ids are never reused
        self._buildable: set[int] = set()  # ids of instances BUILD may set the state of

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout)
        ):
            return getattr(torch, name)
        raise _Refused(f"refusing {module}.{name}: not part of DCP checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refusing a persistent id: DCP metadata has none")

    # ------------------------------------------------------------------ depth bookkeeping

    def _of(self, obj: Any) -> int:
        return self._depth.get(id(obj), 0)

    def _made(self, obj: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Refused(f"containers nested more than {MAX_DEPTH} deep")
        key = id(obj)
        if key not in self._depth:
            self._keep.append(obj)
        self._depth[key] = max(depth, self._depth.get(key, 0))

    def _nest(self, items: Any) -> int:
        """Marks `items` as put inside a container; returns their largest depth."""
        deepest = 0
        for x in items:
            d = self._depth.get(id(x))
            if d is not None:
                self._nested.add(id(x))
                deepest = max(deepest, d)
        return deepest

    def _fill(self, target: Any, items: Any) -> None:
        key = id(target)
        if key not in self._depth:
            raise _Refused("the pickle modifies an object it did not build")
        if key in self._nested:
            raise _Refused("the pickle fills a container after putting it inside another")
        self._made(target, 1 + self._nest(items))

    def _load_build(self: Any) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if id(inst) not in self._buildable:
            raise _Refused(f"BUILD of {type(inst).__name__}: not an object of DCP metadata")
        self._fill(inst, [state])
        _P.dispatch[pickle.BUILD[0]](self)

    def _refuse(self) -> None:
        raise _Refused("refusing out-of-band buffers and bytearrays: DCP metadata has none")


def _wrap_new(op: bytes, take: int | None) -> None:
    """An opcode that builds a new container from the top `take` items (None: the items
    above the mark)."""
    orig = _P.dispatch[op[0]]

    def run(self: Any) -> None:
        stack = self.stack
        items = list(stack if take is None else stack[len(stack) - take :])
        orig(self)
        self._made(self.stack[-1], 1 + self._nest(items))

    _MetadataUnpickler.dispatch[op[0]] = run


def _wrap_fill(op: bytes, where: str) -> None:
    """An opcode that adds items to a container built earlier."""
    orig = _P.dispatch[op[0]]

    def run(self: Any) -> None:
        if where == "mark":  # APPENDS, SETITEMS, ADDITEMS: the target is below the mark
            target, items = self.metastack[-1][-1], list(self.stack)
        elif where == "append":
            target, items = self.stack[-2], [self.stack[-1]]
        else:  # SETITEM
            target, items = self.stack[-3], self.stack[-2:]
        self._fill(target, items)
        orig(self)

    _MetadataUnpickler.dispatch[op[0]] = run


def _wrap_make(op: bytes, take: int | None) -> None:
    """REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ: a call of an allowed class (find_class let
    nothing else onto the stack); an instance of DCP's metadata types may then be BUILT."""
    orig = _P.dispatch[op[0]]

    def run(self: Any) -> None:
        stack = self.stack
        items = list(stack if take is None else stack[len(stack) - take :])
        orig(self)
        obj = self.stack[-1]
        self._made(obj, 1 + self._nest(items))
        if type(obj) in _BUILDABLE:
            self._buildable.add(id(obj))

    _MetadataUnpickler.dispatch[op[0]] = run


for _op, _take in (
    (pickle.TUPLE, None),
    (pickle.TUPLE1, 1),
    (pickle.TUPLE2, 2),
    (pickle.TUPLE3, 3),
    (pickle.EMPTY_TUPLE, 0),
    (pickle.EMPTY_LIST, 0),
    (pickle.EMPTY_DICT, 0),
    (pickle.EMPTY_SET, 0),
    (pickle.LIST, None),
    (pickle.DICT, None),
    (pickle.FROZENSET, None),
):
    _wrap_new(_op, _take)
for _op, _where in (
    (pickle.APPEND, "append"),
    (pickle.APPENDS, "mark"),
    (pickle.SETITEM, "setitem"),
    (pickle.SETITEMS, "mark"),
    (pickle.ADDITEMS, "mark"),
):
    _wrap_fill(_op, _where)
for _op, _take in (
    (pickle.REDUCE, 2),
    (pickle.NEWOBJ, 2),
    (pickle.NEWOBJ_EX, 3),
    (pickle.INST, None),
    (pickle.OBJ, None),
):
    _wrap_make(_op, _take)
_MetadataUnpickler.dispatch[pickle.BUILD[0]] = _MetadataUnpickler._load_build
for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    _MetadataUnpickler.dispatch[_op[0]] = _MetadataUnpickler._refuse


def _buildable_types() -> tuple[type, ...]:
    from collections import OrderedDict

    from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

    return (
        Metadata,
        TensorStorageMetadata,
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        MetadataIndex,
        StorageMeta,
        _StorageInfo,
        _StoragePrefix,
        OrderedDict,
    )


_BUILDABLE = _buildable_types()


def unpickle_metadata(blob: bytes, where: str) -> Any:
    """The object a `.metadata` pickle holds, or a FormatError naming `where`."""
    try:
        return _MetadataUnpickler(io.BytesIO(blob)).load()
    except _Refused as e:
        raise FormatError(f"{where}: not valid DCP metadata ({e})") from None
    except Exception as e:  # a malformed pickle: only allowed constructors ran
        raise FormatError(f"{where}: not valid DCP metadata ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- checks


def read_stock_metadata(directory: str) -> tuple[Metadata, dict[str, int]]:
    """Reads and checks the `.metadata` of a FileSystemWriter checkpoint in `directory`:
    returns DCP's Metadata and {data file: byte count}. Every data file it names must be
    a regular file inside the directory (no absolute or `..` name, no link), every entry
    must lie inside its file without overlapping another, and each tensor's chunks must
    tile it, so what a read allocates is bounded by the bytes on disk."""
    where = os.path.join(directory, STOCK_METADATA_NAME)
    fd = open_inside(directory, STOCK_METADATA_NAME, where)
    try:
        nbytes = os.fstat(fd).st_size
        if nbytes > MAX_METADATA_NBYTES:
            raise FormatError(f"{where}: {nbytes} bytes, over the {MAX_METADATA_NBYTES}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read()
    finally:
        os.close(fd)
    md = unpickle_metadata(blob, where)
    if type(md) is not Metadata:
        raise FormatError(f"{where}: holds a {type(md).__name__}, not DCP Metadata")
    try:
        sizes = _check(md, directory, where)
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: malformed checkpoint metadata ({e})") from None
    if md.storage_meta is None:
        md.storage_meta = StorageMeta()
    return md, sizes


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is not torch.Size or len(v) > MAX_NDIM or not all(0 <= x < 2**63 for x in v):
        raise ValueError(f"bad {what} {v!r}"[:200])
    return tuple(v)


def _check(md: Metadata, directory: str, where: str) -> dict[str, int]:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    sdm = md.state_dict_metadata
    if type(sdm) is not dict:
        raise ValueError("state_dict_metadata is not a dict")
    expected: dict[tuple[str, Any], int] = {}  # least byte count of each entry
    for fqn, sm in sdm.items():
        if type(fqn) is not str:
            raise ValueError("a state_dict_metadata key is not a string")
        if type(sm) is BytesStorageMetadata:
            expected[(fqn, None)] = 0
            continue
        if type(sm) is not TensorStorageMetadata:
            raise ValueError(f"{fqn!r} has metadata of type {type(sm).__name__}")
        p = sm.properties
        if (
            type(p) is not TensorProperties
            or not isinstance(p.dtype, torch.dtype)
            or str(p.dtype).removeprefix("torch.") not in TORCH_ITEMSIZE
            or p.layout is not torch.strided
            or type(p.requires_grad) is not bool
            or type(p.pin_memory) is not bool
            or p.memory_format
            not in (torch.contiguous_format, torch.channels_last, torch.preserve_format)
        ):
            raise ValueError(f"the tensor properties of {fqn!r}")
        size = _shape(sm.size, f"size of {fqn!r}")
        if type(sm.chunks) is not list or not all(
            type(c) is ChunkStorageMetadata for c in sm.chunks
        ):
            raise ValueError(f"the chunks of {fqn!r}")
        chunks = [
            (_shape(c.offsets, "chunk offset"), _shape(c.sizes, "chunk size")) for c in sm.chunks
        ]
        try:
            check_tiling(size, chunks)
        except ValueError as e:
            raise ValueError(f"the chunks of {fqn!r}: {e}") from None
        for off, sz in chunks:
            expected[(fqn, off)] = max(
                expected.get((fqn, off), 0), math.prod(sz) * p.dtype.itemsize
            )
    sd = md.storage_data
    if type(sd) is not dict or len(sd) != len(expected):
        raise ValueError(
            f"storage_data has {len(sd) if type(sd) is dict else 'no'} entries for "
            f"{len(expected)} chunks and BYTE_IO values"
        )
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in sd.items():
        if type(index) is not MetadataIndex or type(index.fqn) is not str:
            raise ValueError("a storage_data key is not a MetadataIndex")
        where_at = None if index.offset is None else _shape(index.offset, "storage offset")
        least = expected.pop((index.fqn, where_at), None)
        if least is None:
            raise ValueError(
                f"storage entry {index.fqn!r} at {where_at} matches no chunk or BYTE_IO value"
            )
        if (
            type(info) is not _StorageInfo
            or type(info.relative_path) is not str
            or type(info.offset) is not int
            or type(info.length) is not int
            or not 0 <= info.offset < 2**63
            or not 0 <= info.length < 2**63
        ):
            raise ValueError(f"the storage entry of {index.fqn!r}")
        if getattr(info, "transform_descriptors", None):
            raise FormatError(
                f"{where}: {index.fqn!r} is stored through stream transforms "
                f"{list(info.transform_descriptors or ())!r} (compression), which tensorfile does not read"
            )
        if info.length < least:
            raise ValueError(f"the entry of {index.fqn!r} holds {info.length} bytes, under {least}")
        by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    sizes: dict[str, int] = {}
    for name, ranges in by_file.items():
        try:
            fd = open_inside(directory, name, where)
        except FileNotFoundError:
            raise IncompleteCheckpointError(
                f"{directory}: checkpoint damaged: {name}, which {where} names, is missing"
            ) from None
        try:
            sizes[name] = os.fstat(fd).st_size
        finally:
            os.close(fd)
        ranges.sort()
        end = 0
        for at, length, fqn in ranges:
            if at < end or at + length > sizes[name]:
                raise FormatError(
                    f"{where}: the bytes of {fqn!r} ({length} at offset {at} of {name}) "
                    f"{'overlap another entry' if at < end else 'run past the end of the file'}"
                )
            end = at + length
    pd = md.planner_data
    if type(pd) is dict and all(type(p) is tuple for p in pd.values()):
        problem = mappings_problem(pd)
        if problem is not None:
            raise ValueError(problem)
        unknown = [k for k in pd if k not in sdm]
        if unknown:
            raise ValueError(
                f"planner_data maps {unknown[0]!r}, which the checkpoint does not hold"
            )
    if md.version is not None and type(md.version) is not str:
        raise ValueError("version")
    meta = md.storage_meta
    if meta is not None and (
        type(meta) is not StorageMeta
        or not (meta.checkpoint_id is None or isinstance(meta.checkpoint_id, (str, os.PathLike)))
        or not all(x is None or type(x) is str for x in (meta.save_id, meta.load_id))
        or type(meta.modules) is not list
        or not all(type(m) is str for m in meta.modules)
    ):
        raise ValueError("storage_meta")
    return sizes


class ItemWindow(io.RawIOBase):
    """Bytes [offset, offset + nbytes) of an open file as a seekable stream (one item of
    a FileSystemWriter data file), read with pread."""

    def __init__(self, fd: int, offset: int, nbytes: int, name: str) -> None:
        super().__init__()
        self._fd, self._offset, self._nbytes, self.name = fd, offset, nbytes, name
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._nbytes}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._nbytes - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos) if n else 0
        self._pos += got
        return got
