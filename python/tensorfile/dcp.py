"""torch.distributed.checkpoint storage plugin: one tensorfile per rank, JSON metadata, atomic commit.

Usage::

    import torch.distributed.checkpoint as dcp
    import tensorfile.dcp

    dcp.save(state_dict, storage_writer=tensorfile.dcp.StorageWriter("ckpt/step100"))
    dcp.load(state_dict, storage_reader=tensorfile.dcp.StorageReader("ckpt/step100"))

The layout on disk, the commit protocol and what a crash leaves behind are described
in docs/dcp.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import json
import math
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.checkpoint import storage as _storage
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.futures import Future

from . import _config, _io
from ._errors import FormatError
from ._files import atomic_file, clean, pwrite_all
from ._reader import open_reader
from .api import save as _save

__all__ = [
    "METADATA_NAME",
    "IncompleteCheckpointError",
    "StorageReader",
    "StorageWriter",
    "dcp_to_state_dict",
    "state_dict_to_dcp",
]

METADATA_NAME = "tensorfile-dcp.json"
"""The commit record: the checkpoint exists once this file does."""

_FORMAT = "tensorfile-dcp"
_FORMAT_VERSION = 1
_DCP_VERSION = "1.0.0"  # the metadata schema version torch's own writer records

# Storages at least this large get one CRC32C per block besides the file's per-storage
# checksum, so a resharded load can read and verify a slice without reading the rest.
_BLOCK_NBYTES = 1 << 20
_MAX_METADATA_NBYTES = 1 << 30
# Staging memory one read batch may hold (for destinations we cannot read into directly).
_BATCH_STAGING_NBYTES = 256 << 20
# Regions closer than this are advised to the kernel as one run (the padding between
# storages is at most 4 KiB, so a whole file read in order is a single run).
_ADVISE_GAP = 64 << 10
_DATA_NAME = re.compile(r"^__(\d+)_([0-9a-f]{16})\.tf$")


class IncompleteCheckpointError(FormatError):
    """The directory holds no committed checkpoint: a save started there did not finish,
    or files the metadata lists are missing."""


@dataclass(frozen=True)
class _StoragePlan:
    file: str  # the rank's data file, relative to the checkpoint directory


@dataclass(frozen=True)
class _Location:
    """Where one write item lives: the tensor at key path `key` of data file `file`."""

    file: str
    key: str
    nbytes: int
    block_crcs: tuple[int, ...] = ()  # CRC32C of each _BLOCK_NBYTES block of the tensor's bytes


def _metadata_name(rank: int | None) -> str:
    return METADATA_NAME if rank is None else f"__{rank}_{METADATA_NAME}"


def _is_local_path(checkpoint_id: Any) -> bool:
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    return "://" not in os.fspath(checkpoint_id)


def _item_key(index: MetadataIndex) -> str:
    if index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(map(str, index.offset))}"


# --------------------------------------------------------------------------- writer


class StorageWriter(_storage.StorageWriter):
    """Writes a DCP checkpoint into directory `path`: each rank saves its items into one
    tensorfile (`__<rank>_<save id>.tf`, checksummed, written atomically and fsynced) and
    the coordinator commits by renaming `tensorfile-dcp.json` into place.

    `durable=False` (or `sync_files=False`, the stock writer's name) skips the fsyncs.
    `num_threads` (or `thread_count`) is the I/O thread count per rank, by default
    TENSORFILE_NUM_THREADS or the core count. `overwrite=False` refuses a directory that
    already holds a committed checkpoint. Files of an older checkpoint in the same
    directory stay untouched until the new commit; the commit then removes them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool | None = None,
        sync_files: bool = True,
        num_threads: int | None = None,
        thread_count: int | None = None,
        overwrite: bool = True,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.durable = sync_files if durable is None else durable
        self.num_threads = num_threads if num_threads is not None else thread_count
        if self.num_threads is not None:
            _config.num_threads(self.num_threads)  # validates
        self.overwrite = overwrite
        self.save_id = secrets.token_hex(8)
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(
        self, checkpoint_id: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any
    ) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = secrets.token_hex(8)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan, *args: Any, **kwargs: Any) -> SavePlan:
        os.makedirs(self.path, exist_ok=True)
        if not self.overwrite:
            own = _metadata_name(None if self.use_collectives else self.rank)
            if os.path.exists(os.path.join(self.path, own)):
                raise FileExistsError(
                    17,
                    f"tensorfile.dcp: {self.path} already holds a checkpoint and overwrite=False",
                    self.path,
                )
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(
                plan, storage_data=_StoragePlan(f"__{self.rank}_{self.save_id}.tf")
            )
        return plan

    def prepare_global_plan(
        self, plans: list[SavePlan], *args: Any, **kwargs: Any
    ) -> list[SavePlan]:
        # One save id for every rank's file: the coordinator's, so the names of one save
        # never collide with the files of the checkpoint they replace.
        return [
            dataclasses.replace(p, storage_data=_StoragePlan(f"__{i}_{self.save_id}.tf"))
            if p.storage_data is None
            else p
            for i, p in enumerate(plans)
        ]

    def write_data(
        self, plan: SavePlan, planner: SavePlanner, *args: Any, **kwargs: Any
    ) -> Future[list[_storage.WriteResult]]:
        sp = plan.storage_data
        if not isinstance(sp, _StoragePlan):
            raise TypeError(
                "tensorfile.dcp.StorageWriter.write_data: the plan was not prepared by this "
                f"writer (storage_data is {type(sp).__name__})"
            )
        tensors: dict[str, torch.Tensor] = {}
        results: list[_storage.WriteResult] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = _item_key(item.index)
            if item.type == WriteItemType.BYTE_IO:
                if not isinstance(data, io.BytesIO):
                    raise TypeError(
                        f"tensorfile.dcp: BYTE_IO item {item.index.fqn!r} resolved to {type(data).__name__}, not BytesIO"
                    )
                raw = bytearray(data.getbuffer())
                t = (
                    torch.frombuffer(raw, dtype=torch.uint8)
                    if raw
                    else torch.empty(0, dtype=torch.uint8)
                )
            else:
                if not isinstance(data, torch.Tensor):
                    raise TypeError(
                        f"tensorfile.dcp: tensor item {item.index.fqn!r} resolved to {type(data).__name__}"
                    )
                t = data.detach()
                if not t.is_contiguous():
                    t = t.contiguous()
            tensors[key] = t
        block_crcs = _block_checksums(tensors, self.num_threads)
        if tensors:  # a rank the planner gave nothing to write leaves no file
            _save(
                tensors,
                os.path.join(self.path, sp.file),
                durable=self.durable,
                num_threads=self.num_threads,
            )
        for item in plan.items:
            key = _item_key(item.index)
            t = tensors[key]
            nbytes = t.numel() * t.element_size()
            results.append(
                _storage.WriteResult(
                    index=item.index,
                    size_in_bytes=nbytes,
                    storage_data=_Location(sp.file, key, nbytes, block_crcs.get(key, ())),
                )
            )
        fut: Future[list[_storage.WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(
        self,
        metadata: Metadata,
        results: list[list[_storage.WriteResult]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        storage_md: dict[MetadataIndex, _Location] = {}
        for wr_list in results:
            for wr in wr_list:
                storage_md[wr.index] = wr.storage_data
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        metadata.version = _DCP_VERSION
        files = sorted({loc.file for loc in storage_md.values()})
        sizes = {}
        for name in files:
            try:
                sizes[name] = os.stat(os.path.join(self.path, name)).st_size
            except FileNotFoundError:
                raise IncompleteCheckpointError(
                    f"{self.path}: rank file {name} is missing at commit time; the checkpoint was not committed"
                ) from None
        doc = _encode_metadata(metadata, sizes)
        rank = None if self.use_collectives else self.rank
        _commit(self.path, _metadata_name(rank), doc, self.durable)
        _remove_replaced(self.path, set(files), rank)

    @classmethod
    def validate_checkpoint_id(
        cls, checkpoint_id: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> bool:
        return _is_local_path(checkpoint_id)


def _block_checksums(
    tensors: dict[str, torch.Tensor], num_threads: int | None
) -> dict[str, tuple[int, ...]]:
    """CRC32C per _BLOCK_NBYTES block of each large CPU tensor, in one parallel pass."""
    keys: list[str] = []
    counts: list[int] = []
    ptrs: list[int] = []
    sizes: list[int] = []
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes < 2 * _BLOCK_NBYTES or t.device.type != "cpu":
            continue
        base = t.data_ptr()
        n = math.ceil(nbytes / _BLOCK_NBYTES)
        for k in range(n):
            ptrs.append(base + k * _BLOCK_NBYTES)
            sizes.append(min(_BLOCK_NBYTES, nbytes - k * _BLOCK_NBYTES))
        keys.append(key)
        counts.append(n)
    if not keys:
        return {}
    crcs = _io.checksum_host(ptrs, sizes, threads=_config.num_threads(num_threads)).tolist()
    out: dict[str, tuple[int, ...]] = {}
    at = 0
    for key, n in zip(keys, counts):
        out[key] = tuple(int(c) for c in crcs[at : at + n])
        at += n
    return out


def _commit(directory: str, name: str, doc: dict[str, Any], durable: bool) -> None:
    """Writes the commit record atomically (a temporary file, fsync, rename over `name`,
    directory fsync): readers see the old commit record or the new one, never none."""
    blob = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    with atomic_file(os.path.join(directory, name), len(blob), durable) as fd:
        pwrite_all(fd, blob, 0)


def _remove_replaced(directory: str, keep: set[str], rank: int | None) -> None:
    """After a commit: removes rank files of earlier or failed saves in this directory
    (with per-rank commits, only this rank's) and temporaries of dead writers."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _DATA_NAME.match(name)
        if m is None or name in keep or (rank is not None and int(m.group(1)) != rank):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    try:
        clean(directory)
    except OSError:
        pass


# --------------------------------------------------------------------------- metadata <-> JSON

_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".", 1)[1]


def _encode_value(v: Any, what: str) -> Any:
    """Plain values as tagged JSON, so tuples, int dict keys and torch.Size survive."""
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if type(v) is tuple:
        return {"tuple": [_encode_value(x, what) for x in v]}
    if type(v) is list:
        return [_encode_value(x, what) for x in v]
    if type(v) is dict:
        return {"dict": [[_encode_value(k, what), _encode_value(x, what)] for k, x in v.items()]}
    raise TypeError(
        f"tensorfile.dcp: {what} holds a {type(v).__name__}; checkpoint metadata is stored as "
        "JSON and can hold only None, bool, int, float, str, list, tuple, dict and torch.Size"
    )


def _decode_value(v: Any) -> Any:
    if type(v) is list:
        return [_decode_value(x) for x in v]
    if type(v) is dict:
        if len(v) != 1:
            raise ValueError("tagged value with more than one key")
        ((tag, body),) = v.items()
        if tag == "tuple":
            return tuple(_decode_value(x) for x in body)
        if tag == "size":
            return torch.Size(int(x) for x in body)
        if tag == "dict":
            return {_decode_value(k): _decode_value(x) for k, x in body}
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        raise ValueError(f"unknown tag {tag!r}")
    return v


def _encode_planner_data(v: Any) -> Any:
    # The default planners record {fqn: key path tuple of str and int}: stored as lists.
    if type(v) is dict and all(
        type(k) is str and type(p) is tuple and all(type(x) in (str, int) for x in p)
        for k, p in v.items()
    ):
        return {"mappings": {k: list(p) for k, p in v.items()}}
    return {"value": _encode_value(v, "planner_data")}


def _decode_planner_data(v: Any) -> Any:
    if type(v) is not dict or len(v) != 1:
        raise ValueError("planner_data")
    if "mappings" in v:
        out = {}
        for k, p in v["mappings"].items():
            if type(p) is not list or not all(type(x) in (str, int) for x in p):
                raise ValueError(f"planner_data key path of {k!r}")
            out[k] = tuple(p)
        return out
    if "value" in v:
        return _decode_value(v["value"])
    raise ValueError("planner_data")


def _encode_metadata(md: Metadata, sizes: dict[str, int]) -> dict[str, Any]:
    """DCP's Metadata as JSON-ready columns: one properties table, one entry per state
    dict key, and the storage index as parallel arrays (20,000 items stay cheap)."""
    props: dict[tuple[Any, ...], int] = {}
    entries: dict[str, Any] = {}
    for fqn, sm in md.state_dict_metadata.items():
        if isinstance(sm, BytesStorageMetadata):
            entries[fqn] = None
            continue
        if not isinstance(sm, TensorStorageMetadata):
            raise TypeError(
                f"tensorfile.dcp: unknown storage metadata {type(sm).__name__} for {fqn!r}"
            )
        p = sm.properties
        pk = (p.dtype, p.layout, p.requires_grad, p.memory_format, p.pin_memory)
        pi = props.get(pk)
        if pi is None:
            if p.layout != torch.strided:
                raise TypeError(
                    f"tensorfile.dcp: {fqn!r} has layout {p.layout}; only strided tensors are supported"
                )
            if not any(f == p.memory_format for f in _MEMORY_FORMATS.values()):
                raise TypeError(f"tensorfile.dcp: {fqn!r} has memory format {p.memory_format}")
            pi = props[pk] = len(props)
        entries[fqn] = [pi, list(sm.size), [[list(c.offsets), list(c.sizes)] for c in sm.chunks]]
    prop_rows = [
        [
            _dtype_name(dtype),
            bool(rg),
            next(k for k, f in _MEMORY_FORMATS.items() if f == mf),
            bool(pin),
        ]
        for dtype, _layout, rg, mf, pin in props
    ]
    file_names = sorted(sizes)
    file_index = {n: i for i, n in enumerate(file_names)}
    fqns, offsets, hints, files, nbytes = [], [], [], [], []
    blocks: dict[str, list[int]] = {}
    for j, (index, loc) in enumerate(md.storage_data.items()):
        fqns.append(index.fqn)
        offsets.append(None if index.offset is None else list(index.offset))
        hints.append(index.index)
        files.append(file_index[loc.file])
        nbytes.append(loc.nbytes)
        if loc.block_crcs:
            blocks[str(j)] = list(loc.block_crcs)
    sm_ = md.storage_meta
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "dcp_version": md.version,
        "block_nbytes": _BLOCK_NBYTES,
        "files": [[n, sizes[n]] for n in file_names],
        "properties": prop_rows,
        "state_dict_metadata": entries,
        "planner_data": _encode_planner_data(md.planner_data),
        "storage_data": {
            "fqn": fqns,
            "offset": offsets,
            "index": hints,
            "file": files,
            "nbytes": nbytes,
            "block_crcs": blocks,
        },
        "storage_meta": None
        if sm_ is None
        else {
            "checkpoint_id": None if sm_.checkpoint_id is None else os.fspath(sm_.checkpoint_id),
            "save_id": sm_.save_id,
            "load_id": sm_.load_id,
            "modules": list(sm_.modules),
        },
    }


def _decode_metadata(doc: Any, where: str) -> tuple[Metadata, dict[str, int]]:
    """Rebuilds DCP's dataclasses from the JSON record; any malformed field is a
    FormatError naming the file (never a KeyError from deep inside a load)."""
    if type(doc) is not dict or doc.get("format") != _FORMAT:
        raise FormatError(f"{where}: not a tensorfile DCP metadata file")
    if doc.get("format_version") != _FORMAT_VERSION:
        raise FormatError(
            f"{where}: metadata format version {doc.get('format_version')!r} is not supported "
            f"(this tensorfile reads version {_FORMAT_VERSION}); upgrade tensorfile"
        )
    try:
        block = doc["block_nbytes"]
        if type(block) is not int or block <= 0:
            raise ValueError("block_nbytes")
        file_rows = doc["files"]
        if type(file_rows) is not list or not all(
            type(r) is list
            and len(r) == 2
            and type(r[0]) is str
            and _DATA_NAME.match(r[0])
            and type(r[1]) is int
            and r[1] >= 0
            for r in file_rows
        ):
            raise ValueError("files")
        file_names = [r[0] for r in file_rows]
        files = dict(map(tuple, file_rows))
        props = []
        for dtype_name, rg, mf, pin in doc["properties"]:
            dtype = getattr(torch, dtype_name, None) if type(dtype_name) is str else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {dtype_name!r}")
            props.append(
                TensorProperties(
                    dtype=dtype,
                    layout=torch.strided,
                    requires_grad=bool(rg),
                    memory_format=_MEMORY_FORMATS[mf],
                    pin_memory=bool(pin),
                )
            )
        sizes: dict[tuple[Any, ...], torch.Size] = {}
        sdm: dict[str, Any] = {}
        for fqn, e in doc["state_dict_metadata"].items():
            if e is None:
                sdm[fqn] = BytesStorageMetadata()
                continue
            pi, size_raw, chunk_rows = e
            size = _size(size_raw, sizes)
            chunks = []
            for off, sz in chunk_rows:
                o, c = _size(off, sizes), _size(sz, sizes)
                if (
                    len(o) != len(size)
                    or len(c) != len(size)
                    or any(a + b > n for a, b, n in zip(o, c, size))
                ):
                    raise ValueError(f"chunk {list(o)}+{list(c)} outside {list(size)} of {fqn!r}")
                chunks.append(ChunkStorageMetadata(offsets=o, sizes=c))
            if type(pi) is not int or not 0 <= pi < len(props):
                raise ValueError(f"properties of {fqn!r}")
            sdm[fqn] = TensorStorageMetadata(properties=props[pi], size=size, chunks=chunks)
        sd = doc["storage_data"]
        fqns, offsets, hints, fidx, nbytes, blocks = (
            sd["fqn"],
            sd["offset"],
            sd["index"],
            sd["file"],
            sd["nbytes"],
            sd["block_crcs"],
        )
        n = len(fqns)
        if not all(type(col) is list and len(col) == n for col in (offsets, hints, fidx, nbytes)):
            raise ValueError("storage_data columns differ in length")
        if type(blocks) is not dict:
            raise ValueError("block_crcs")
        storage: dict[MetadataIndex, _Location] = {}
        suffixes: dict[Any, str] = {}
        for j in range(n):
            fqn, off, f, nb = fqns[j], offsets[j], fidx[j], nbytes[j]
            if type(fqn) is not str or type(f) is not int or not 0 <= f < len(file_names):
                raise ValueError(f"storage entry {j}")
            if type(nb) is not int or nb < 0:
                raise ValueError(f"byte count of {fqn!r}")
            crcs = blocks.get(str(j), ())
            if crcs and (
                len(crcs) != -(-nb // block)
                or not all(type(c) is int and 0 <= c < 2**32 for c in crcs)
            ):
                raise ValueError(f"block checksums of {fqn!r}")
            index = MetadataIndex(
                fqn,
                None if off is None else _size(off, sizes),
                hints[j] if type(hints[j]) is int else None,
            )
            if off is None:
                key = fqn
            else:  # as _item_key, with the offsets' text shared between items
                suffix = suffixes.get(index.offset)
                if suffix is None:
                    suffix = suffixes[index.offset] = "@" + ",".join(map(str, off))
                key = fqn + suffix
            storage[index] = _Location(file_names[f], key, nb, tuple(crcs))
        sm = doc["storage_meta"]
        storage_meta = (
            None
            if sm is None
            else StorageMeta(
                checkpoint_id=sm["checkpoint_id"],
                save_id=sm["save_id"],
                load_id=sm["load_id"],
                modules=[str(m) for m in sm["modules"]],
            )
        )
        md = Metadata(
            state_dict_metadata=sdm,
            planner_data=_decode_planner_data(doc["planner_data"]),
            storage_data=storage,
            storage_meta=storage_meta,
            version=doc["dcp_version"],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(
            f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
        ) from None
    if block != _BLOCK_NBYTES and any(loc.block_crcs for loc in storage.values()):
        raise FormatError(f"{where}: checksum block size {block} is not supported")
    return md, files


def _size(v: Any, cache: dict[tuple[Any, ...], torch.Size] | None = None) -> torch.Size:
    """A validated torch.Size from a JSON list; `cache` shares equal sizes (20,000 small
    tensors have a handful of distinct shapes and offsets)."""
    if type(v) is not list:
        raise ValueError(f"bad shape {v!r}")
    if cache is not None:
        key = tuple(v)
        hit = cache.get(key)  # a list element (unhashable) raises TypeError: malformed
        if hit is not None:
            return hit
    for x in v:
        if type(x) is not int or x < 0:
            raise ValueError(f"bad shape {v!r}")
    out = torch.Size(v)
    if cache is not None:
        cache[key] = out
    return out


# --------------------------------------------------------------------------- reader


class StorageReader(_storage.StorageReader):
    """Reads a checkpoint written by StorageWriter. Each rank reads only the bytes of the
    chunks its plan asks for, straight into the destination tensors where their layout
    allows, checking CRC32C checksums (per storage, or per 1 MiB block for a slice of a
    large chunk). `verify=False` skips the checksums, never the structural checks.
    A directory whose save did not commit raises IncompleteCheckpointError."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.verify = verify
        self.num_threads = num_threads
        self.storage_data: dict[MetadataIndex, _Location] = {}
        self.load_id = secrets.token_hex(8)
        self.rank: int | None = None
        self.use_collectives = True

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(
        self, checkpoint_id: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = secrets.token_hex(8)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md, _ = read_metadata(self.path, rank=kwargs.get("rank"))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        sd = metadata.storage_data
        if not isinstance(sd, dict) or not all(isinstance(v, _Location) for v in sd.values()):
            raise FormatError(
                f"{self.path}: the metadata's storage_data was not written by tensorfile.dcp.StorageWriter"
            )
        self.storage_data = sd

    def prepare_local_plan(self, plan: LoadPlan, *args: Any, **kwargs: Any) -> LoadPlan:
        return plan

    def prepare_global_plan(
        self, plans: list[LoadPlan], *args: Any, **kwargs: Any
    ) -> list[LoadPlan]:
        return plans

    def read_data(
        self, plan: LoadPlan, planner: LoadPlanner, *args: Any, **kwargs: Any
    ) -> Future[None]:
        by_file: dict[str, list[tuple[ReadItem, _Location]]] = {}
        for req in plan.items:
            loc = self.storage_data.get(req.storage_index)
            if loc is None:
                raise FormatError(
                    f"{self.path}: the checkpoint holds no data for {req.storage_index.fqn!r} "
                    f"at offset {list(req.storage_index.offset or ())}"
                )
            by_file.setdefault(loc.file, []).append((req, loc))
        threads = _config.num_threads(self.num_threads)
        for name in sorted(by_file):
            _read_file(os.path.join(self.path, name), by_file[name], planner, self.verify, threads)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(
        cls, checkpoint_id: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> bool:
        return _is_local_path(checkpoint_id)


def read_metadata(
    path: str | os.PathLike[str], rank: int | None = None
) -> tuple[Metadata, dict[str, int]]:
    """Reads and checks the commit record of the checkpoint in directory `path`; returns
    DCP's Metadata and {data file: byte count}. Raises IncompleteCheckpointError when no
    save committed there or a listed file is missing or has the wrong size."""
    directory = os.fspath(path)
    name = _metadata_name(rank)
    where = os.path.join(directory, name)
    try:
        fd = os.open(where, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _missing_metadata(directory, name) from None
    try:
        nbytes = os.fstat(fd).st_size
        if nbytes > _MAX_METADATA_NBYTES:
            raise FormatError(
                f"{where}: {nbytes} bytes, over the {_MAX_METADATA_NBYTES}-byte limit"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read()
    finally:
        os.close(fd)
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e}); the metadata file is damaged") from None
    md, files = _decode_metadata(doc, where)
    problems = []
    for fname, want in files.items():
        try:
            got = os.stat(os.path.join(directory, fname)).st_size
        except FileNotFoundError:
            problems.append(f"{fname} is missing")
            continue
        if got != want:
            problems.append(f"{fname} holds {got} bytes, the commit recorded {want}")
    if problems:
        raise IncompleteCheckpointError(
            f"{directory}: checkpoint incomplete or damaged: {'; '.join(problems[:4])}"
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        )
    return md, files


def _missing_metadata(directory: str, name: str) -> Exception:
    if not os.path.isdir(directory):
        return FileNotFoundError(
            2, f"tensorfile.dcp: no checkpoint directory {directory}", directory
        )
    names = os.listdir(directory)
    data = [n for n in names if _DATA_NAME.match(n)]
    tmps = [n for n in names if n.endswith(".tftmp") or n.endswith(".tmp")]
    if ".metadata" in names and not data:
        return FormatError(
            f"{directory}: this checkpoint was written by torch's FileSystemWriter; read it with "
            "FileSystemReader or tensorfile.dcp.dcp_to_state_dict"
        )
    if data or tmps:
        return IncompleteCheckpointError(
            f"{directory}: checkpoint incomplete: its save did not commit ({name} is missing; "
            f"{len(data)} rank file(s) and {len(tmps)} temporary file(s) are present)"
        )
    return IncompleteCheckpointError(
        f"{directory}: no checkpoint here ({name} is missing and no save has written data)"
    )


@dataclass
class _Batch:
    """Regions for one read_regions call, and what to do once they are in memory."""

    ptrs: list[int] = dataclasses.field(default_factory=list)
    nbytes: list[int] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    crcs: list[int] = dataclasses.field(default_factory=list)  # expected; -1: not checked
    labels: list[str] = dataclasses.field(default_factory=list)
    copies: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # dst, src, n
    after: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    keep: list[Any] = dataclasses.field(default_factory=list)
    staged: int = 0

    def add(self, ptr: int, nbytes: int, offset: int, crc: int, label: str) -> None:
        if nbytes:
            self.ptrs.append(ptr)
            self.nbytes.append(nbytes)
            self.offsets.append(offset)
            self.crcs.append(crc)
            self.labels.append(label)


def _read_file(
    path: str,
    reqs: list[tuple[ReadItem, _Location]],
    planner: LoadPlanner,
    verify: bool,
    threads: int,
) -> None:
    reader = _open_native(path, verify)
    try:
        lay = reader.layout
        keys = reader.key_index()
        batch = _Batch()
        for req, loc in reqs:
            i = keys.get(loc.key)
            if i is None or loc.key in reader.ambiguous:
                raise FormatError(
                    f"{path}: no tensor {loc.key!r} (the checkpoint metadata and this rank file disagree)"
                )
            kind, s, dtype_name, shape, strides, off, _flags = lay.tensors[i]
            dtype = getattr(torch, dtype_name, None) if kind == "torch" else None
            if not isinstance(dtype, torch.dtype):
                raise FormatError(f"{path}: {loc.key!r} is not a torch tensor")
            isz = dtype.itemsize
            numel = math.prod(shape)
            if list(strides) != _contiguous_strides(shape) or numel * isz != loc.nbytes:
                raise FormatError(
                    f"{path}: {loc.key!r} has shape {list(shape)} and strides {list(strides)}, "
                    f"not the contiguous {loc.nbytes} bytes the metadata records"
                )
            if req.type == LoadItemType.BYTE_IO:
                _plan_bytes(batch, path, lay, s, off, loc, req, planner, verify)
            else:
                _plan_tensor(
                    batch, path, lay, s, off, loc, req, planner, verify, dtype, shape, strides
                )
            if batch.staged >= _BATCH_STAGING_NBYTES:
                _flush(batch, reader, path, verify, threads)
                batch = _Batch()
        _flush(batch, reader, path, verify, threads)
    finally:
        reader.close()


def _open_native(path: str, verify: bool) -> Any:
    """Opens a rank file with tensorfile's own reader (header validated, checksummed)."""
    reader = open_reader(path, verify)
    if reader.format != "tensorfile" or reader.src.fd is None:
        reader.close()
        raise FormatError(f"{path}: not a tensorfile; the checkpoint's rank files must be")
    return reader


def _contiguous_strides(shape: list[int]) -> list[int]:
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * max(shape[d + 1], 1)
    return out


def _plan_tensor(
    batch: _Batch,
    path: str,
    lay: Any,
    s: int,
    off: int,
    loc: _Location,
    req: ReadItem,
    planner: LoadPlanner,
    verify: bool,
    dtype: torch.dtype,
    shape: list[int],
    strides: list[int],
) -> None:
    so, ln = list(req.storage_offsets), list(req.lengths)
    whole = ln == shape and not any(so)  # the common case: the whole saved chunk
    if not whole and (
        len(so) != len(shape)
        or len(ln) != len(shape)
        or any(o + n > d for o, n, d in zip(so, ln, shape))
    ):
        raise FormatError(
            f"{path}: {loc.key!r} has shape {list(shape)}; the load asks for {ln} at {so}"
        )
    dest = planner.resolve_tensor(req).detach()
    if list(dest.shape) != ln:
        raise ValueError(
            f"tensorfile.dcp: destination for {req.dest_index.fqn!r} has shape {list(dest.shape)}, expected {ln}"
        )
    count = math.prod(ln)
    isz = dtype.itemsize
    if count == 0:
        batch.after.append(lambda: planner.commit_tensor(req, dest))
        return
    if whole:
        a, b, contiguous = off, off + count * isz, True
    else:
        first = sum(o * st for o, st in zip(so, strides))
        last = first + sum((n - 1) * st for n, st in zip(ln, strides))
        a, b = off + first * isz, off + (last + 1) * isz  # byte range within the storage
        contiguous = last - first + 1 == count
    label = loc.key
    if contiguous and dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous():
        _plan_range(batch, lay, s, off, loc, a, b, dest.data_ptr(), verify, label)

        def done() -> None:
            if dtype == torch.bool:
                _io.check_bool_bytes(path, repr(label), dest.view(torch.uint8))
            planner.commit_tensor(req, dest)

    else:
        # The slice is strided in the file, or the destination is elsewhere (another
        # device, another layout): stage the covering byte range, then copy the slice.
        staging = torch.empty(b - a, dtype=torch.uint8)
        batch.keep.append(staging)
        batch.staged += b - a
        _plan_range(batch, lay, s, off, loc, a, b, staging.data_ptr(), verify, label)

        def done() -> None:
            if dtype == torch.bool:
                _io.check_bool_bytes(path, repr(label), staging)
            dest.copy_(staging.view(dtype).as_strided(ln, strides))
            planner.commit_tensor(req, dest)

    batch.after.append(done)


def _plan_bytes(
    batch: _Batch,
    path: str,
    lay: Any,
    s: int,
    off: int,
    loc: _Location,
    req: ReadItem,
    planner: LoadPlanner,
    verify: bool,
) -> None:
    buf = bytearray(loc.nbytes)
    batch.keep.append(buf)
    batch.staged += loc.nbytes
    if loc.nbytes:
        ptr = ctypes.addressof((ctypes.c_char * loc.nbytes).from_buffer(buf))
        _plan_range(batch, lay, s, off, loc, off, off + loc.nbytes, ptr, verify, loc.key)
    batch.after.append(lambda: planner.load_bytes(req, io.BytesIO(bytes(buf))))


def _plan_range(
    batch: _Batch,
    lay: Any,
    s: int,
    off: int,
    loc: _Location,
    a: int,
    b: int,
    ptr: int,
    verify: bool,
    label: str,
) -> None:
    """Plans reading bytes [a, b) of storage s into `ptr`, checked against the finest
    checksum that covers them without reading much more than asked."""
    base = int(lay.storage_offsets[s])
    snb = int(lay.storage_nbytes[s])
    if not verify:
        batch.add(ptr, b - a, base + a, -1, label)
        return
    if a == 0 and b == snb:
        batch.add(ptr, b - a, base, int(lay.storage_crcs[s]), label)
        return
    if loc.block_crcs:
        # Blocks are counted from the tensor's first byte (offset `off` in the storage).
        lo, hi = a - off, b - off
        for k in range(lo // _BLOCK_NBYTES, -(-hi // _BLOCK_NBYTES)):
            blo = k * _BLOCK_NBYTES
            bhi = min(blo + _BLOCK_NBYTES, loc.nbytes)
            crc = loc.block_crcs[k]
            if lo <= blo and bhi <= hi:
                batch.add(ptr + blo - lo, bhi - blo, base + off + blo, crc, label)
            else:  # an edge block: read it whole to check it, keep the part asked for
                edge = np.empty(bhi - blo, dtype=np.uint8)
                batch.keep.append(edge)
                batch.add(edge.ctypes.data, bhi - blo, base + off + blo, crc, label)
                start, end = max(lo, blo), min(hi, bhi)
                batch.copies.append((ptr + start - lo, edge.ctypes.data + start - blo, end - start))
        return
    # A small storage (or one saved from a GPU): read it whole and check it.
    whole = np.empty(snb, dtype=np.uint8)
    batch.keep.append(whole)
    batch.staged += snb
    batch.add(whole.ctypes.data, snb, base, int(lay.storage_crcs[s]), label)
    batch.copies.append((ptr, whole.ctypes.data + a, b - a))


def _flush(batch: _Batch, reader: Any, path: str, verify: bool, threads: int) -> None:
    if batch.ptrs:
        assert reader.src.fd is not None
        offsets = np.array(batch.offsets, dtype=np.uint64)
        nbytes = np.array(batch.nbytes, dtype=np.uint64)
        ptrs = np.array(batch.ptrs, dtype=np.uint64)
        want = np.array(batch.crcs, dtype=np.int64)
        order = np.argsort(offsets, kind="stable")
        # The engine takes sorted, disjoint regions; two requests may need the same bytes
        # (one storage read whole for two slices), so overlapping regions go in later passes.
        passes: list[list[int]] = []
        ends: list[int] = []
        for j in order.tolist():
            at = int(offsets[j])
            for p, end in enumerate(ends):
                if end <= at:
                    passes[p].append(j)
                    ends[p] = at + int(nbytes[j])
                    break
            else:
                passes.append([j])
                ends.append(at + int(nbytes[j]))
        # Cold reads: tell the kernel the whole plan up front, so it reads ahead in large
        # sequential requests while the engine's threads copy and check.
        _io.advise_willneed(
            reader.src.fd,
            [(int(offsets[j]), int(offsets[j]) + int(nbytes[j])) for j in order.tolist()],
            _ADVISE_GAP,
        )
        for sel_list in passes:
            sel = np.array(sel_list, dtype=np.int64)
            got = _io.read_host(
                reader.src.fd,
                path,
                ptrs[sel],
                nbytes[sel],
                offsets[sel],
                threads=threads,
                checksum=verify,
                hugepages=_config.hugepages(),
            )
            if verify:

                def label(j: int, sel: np.ndarray = sel) -> str:
                    return repr(batch.labels[int(sel[j])])

                _io.check_checksums(
                    path,
                    got,
                    want[sel],
                    label,
                    remedy="re-save the checkpoint, or load with StorageReader(..., verify=False)",
                )
    for dst, src, n in batch.copies:
        ctypes.memmove(dst, src, n)
    for fn in batch.after:
        fn()


# --------------------------------------------------------------------------- conversion


class _StockMetadataUnpickler(pickle.Unpickler):
    """Unpickles the `.metadata` of torch's FileSystemWriter allowing only the classes
    that file holds: DCP's metadata dataclasses, torch sizes, dtypes and layouts, paths.
    Anything else (a callable that would run code) is refused."""

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

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: not part of DCP checkpoint metadata"
        )


def _stock_reader(directory: str) -> _storage.StorageReader:
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            where = os.path.join(directory, ".metadata")
            with open(where, "rb") as f:
                try:
                    md = _StockMetadataUnpickler(f).load()
                except (
                    pickle.UnpicklingError,
                    EOFError,
                    AttributeError,
                    TypeError,
                    ValueError,
                ) as e:
                    raise FormatError(f"{where}: not valid DCP metadata ({e})") from None
            if not isinstance(md, Metadata):
                raise FormatError(f"{where}: holds a {type(md).__name__}, not DCP Metadata")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            return md

    return _SafeFileSystemReader(directory)


def _open_any(path: str) -> _storage.StorageReader:
    if os.path.exists(os.path.join(path, METADATA_NAME)):
        return StorageReader(path)
    if os.path.exists(os.path.join(path, ".metadata")):
        return _stock_reader(path)
    raise _missing_metadata(path, METADATA_NAME)


def dcp_to_state_dict(path: str | os.PathLike[str], *, nested: bool = True) -> dict[str, Any]:
    """Reads a whole DCP checkpoint directory, written by this plugin or by torch's
    FileSystemWriter, into a state dict of full (unsharded) CPU tensors. Single process,
    no process group needed. With `nested=True` the dict is rebuilt in the shape the
    saver flattened (from the planner's mappings, when recorded); otherwise keys are
    the flat DCP names ("model.layer.weight").

    Memory: the full tensors plus, for this plugin, a bounded staging area; the stock
    format is read one item at a time. Non-tensor values are unpickled with
    torch.load(weights_only=True), and the stock metadata with an allow-list unpickler,
    so no code in the checkpoint runs.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    directory = os.fspath(path)
    reader = _open_any(directory)
    md = reader.read_metadata()
    flat: dict[str, Any] = {}
    for fqn, sm in md.state_dict_metadata.items():
        if isinstance(sm, TensorStorageMetadata):
            flat[fqn] = torch.empty(sm.size, dtype=sm.properties.dtype)
        else:
            flat[fqn] = None

    class _SafeBytesPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    with _single_process():
        load(
            flat,
            storage_reader=_PreReadReader(reader, md),
            planner=_SafeBytesPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            no_dist=True,
        )
    mappings = md.planner_data
    if not nested or not isinstance(mappings, dict) or not mappings:
        return flat
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        _set_path(out, mappings.get(fqn, (fqn,)), value)
    return out


class _PreReadReader(_storage.StorageReader):
    """Hands DCP a reader whose metadata was already read (once, checked)."""

    def __init__(self, inner: _storage.StorageReader, md: Metadata) -> None:
        self._inner = inner
        self._md = md

    def reset(self, checkpoint_id: Any = None, *args: Any, **kwargs: Any) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._inner.set_up_storage_reader(metadata, is_coordinator)

    def prepare_local_plan(self, plan: LoadPlan, *args: Any, **kwargs: Any) -> LoadPlan:
        return self._inner.prepare_local_plan(plan)

    def prepare_global_plan(
        self, plans: list[LoadPlan], *args: Any, **kwargs: Any
    ) -> list[LoadPlan]:
        return self._inner.prepare_global_plan(plans)

    def read_data(
        self, plan: LoadPlan, planner: LoadPlanner, *args: Any, **kwargs: Any
    ) -> Future[None]:
        return self._inner.read_data(plan, planner)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any, *args: Any, **kwargs: Any) -> bool:
        return False


def _set_path(root: dict[Any, Any], path: Any, value: Any) -> None:
    if not isinstance(path, (tuple, list)) or not path:
        raise FormatError(f"checkpoint planner data holds an invalid key path {path!r}")
    cur: Any = root
    for k, nxt in zip(path[:-1], path[1:]):
        if isinstance(cur, dict):
            if k not in cur:
                cur[k] = [] if isinstance(nxt, int) else {}
            cur = cur[k]
        elif isinstance(cur, list) and isinstance(k, int):
            while len(cur) <= k:
                cur.append(None)
            if cur[k] is None:
                cur[k] = [] if isinstance(nxt, int) else {}
            cur = cur[k]
        else:
            raise FormatError(f"checkpoint planner data: key path {path!r} crosses a leaf")
    last = path[-1]
    if isinstance(cur, list) and isinstance(last, int):
        while len(cur) <= last:
            cur.append(None)
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise FormatError(f"checkpoint planner data: key path {path!r} crosses a leaf")


def state_dict_to_dcp(
    state_dict: dict[str, Any], path: str | os.PathLike[str], **writer_kwargs: Any
) -> Metadata:
    """Writes `state_dict` (tensors, nested dicts and lists of them, other picklable
    values) as a DCP checkpoint directory with this plugin, from a single process without
    a process group; `dcp.load` on any number of ranks can read it back. Returns the
    checkpoint's Metadata. `writer_kwargs` go to StorageWriter."""
    from torch.distributed.checkpoint import save

    with _single_process():
        return save(state_dict, storage_writer=StorageWriter(path, **writer_kwargs), no_dist=True)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    # dcp.save/load warn that they assume a single process; here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
