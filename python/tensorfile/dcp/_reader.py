"""The DCP StorageReader: reads the byte ranges each rank needs, checked, into DCP's destinations."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.checkpoint import storage as _storage
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from .._config import hugepages
from .._config import num_threads as resolve_threads
from .._errors import FormatError
from .._io import advise_willneed, check_bool_bytes, check_checksums, read_host
from . import _objects
from ._common import (
    ADVISE_GAP,
    BATCH_STAGING_NBYTES,
    BLOCK_NBYTES,
    Location,
    contiguous_strides,
    is_local_path,
    metadata_name,
)
from ._record import open_native, read_metadata


class StorageReader(_storage.StorageReader):
    """Reads a checkpoint written by StorageWriter. Each rank reads only the bytes of the
    chunks its plan asks for, straight into the destination tensors where their layout
    allows, checking CRC32C checksums (per storage, or per 1 MiB block for a slice of a
    large chunk). `verify=False` skips the checksums, never the structural checks.
    A directory whose save did not commit raises IncompleteCheckpointError.

    `path` may be an object URL (``s3://bucket/prefix``, gs://, az://, https://): the
    commit record is fetched whole, each data object's header and then the byte ranges
    the plan needs by concurrent ranged GETs, checked as for files. `storage_options`
    configures the store (see tensorfile._remote.store_for)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        num_threads: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self._set_path(path)
        self.verify = verify
        self.num_threads = num_threads
        self.storage_data: dict[MetadataIndex, Location] = {}
        self.file_nbytes: dict[str, int] = {}
        self.load_id = secrets.token_hex(8)
        self.rank: int | None = None
        self.use_collectives = True

    def _set_path(self, path: str | os.PathLike[str]) -> None:
        self.target = _objects.object_target(path)
        self.path = self.target.url if self.target is not None else _objects.local_path(path)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(
        self, checkpoint_id: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.load_id = secrets.token_hex(8)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if self.target is not None:
            md, self.file_nbytes = _objects.read_metadata(
                self.target, metadata_name(rank), rank, self.storage_options
            )
        else:
            md, _ = read_metadata(self.path, rank=rank)
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
        if not isinstance(sd, dict) or not all(isinstance(v, Location) for v in sd.values()):
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
        by_file: dict[str, list[tuple[ReadItem, Location]]] = {}
        for req in plan.items:
            loc = self.storage_data.get(req.storage_index)
            if loc is None:
                raise FormatError(
                    f"{self.path}: the checkpoint holds no data for {req.storage_index.fqn!r} "
                    f"at offset {list(req.storage_index.offset or ())}"
                )
            by_file.setdefault(loc.file, []).append((req, loc))
        threads = resolve_threads(self.num_threads)
        for name in sorted(by_file):
            if self.target is not None:
                if name not in self.file_nbytes:  # read_data without read_metadata first
                    self.read_metadata(rank=None if self.use_collectives else self.rank)
                nbytes = self.file_nbytes.get(name)
                if nbytes is None:
                    raise FormatError(
                        f"{self.path}: the metadata names data file {name!r}, which its "
                        "commit record does not list"
                    )
                opener = functools.partial(
                    _objects.open_native,
                    self.target,
                    name,
                    nbytes,
                    self.verify,
                    self.storage_options,
                )
                _read_file(self.path, name, by_file[name], planner, self.verify, threads, opener)
            else:
                _read_file(self.path, name, by_file[name], planner, self.verify, threads)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(
        cls, checkpoint_id: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> bool:
        return is_local_path(checkpoint_id)


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
    directory: str,
    name: str,
    reqs: list[tuple[ReadItem, Location]],
    planner: LoadPlanner,
    verify: bool,
    threads: int,
    opener: Callable[[], Any] | None = None,
) -> None:
    """Reads `reqs` from rank file `name` of `directory`; `opener` opens it elsewhere
    (an object in a store) instead."""
    remote = opener is not None
    path = f"{directory.rstrip('/')}/{name}" if remote else os.path.join(directory, name)
    reader = opener() if opener is not None else open_native(directory, name, verify)
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
            if list(strides) != contiguous_strides(shape) or numel * isz != loc.nbytes:
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
            if batch.staged >= BATCH_STAGING_NBYTES:
                _flush_any(batch, reader, path, verify, threads, remote)
                batch = _Batch()
        _flush_any(batch, reader, path, verify, threads, remote)
    finally:
        reader.close()


def _plan_tensor(
    batch: _Batch,
    path: str,
    lay: Any,
    s: int,
    off: int,
    loc: Location,
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
                check_bool_bytes(path, repr(label), dest.view(torch.uint8))
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
                check_bool_bytes(path, repr(label), staging)
            dest.copy_(staging.view(dtype).as_strided(ln, strides))
            planner.commit_tensor(req, dest)

    batch.after.append(done)


def _plan_bytes(
    batch: _Batch,
    path: str,
    lay: Any,
    s: int,
    off: int,
    loc: Location,
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
    loc: Location,
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
        for k in range(lo // BLOCK_NBYTES, -(-hi // BLOCK_NBYTES)):
            blo = k * BLOCK_NBYTES
            bhi = min(blo + BLOCK_NBYTES, loc.nbytes)
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


def _flush_any(
    batch: _Batch, reader: Any, path: str, verify: bool, threads: int, remote: bool
) -> None:
    if remote:
        _objects.flush(batch, reader, verify, threads)
    else:
        _flush(batch, reader, path, verify, threads)


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
        advise_willneed(
            reader.src.fd,
            [(int(offsets[j]), int(offsets[j]) + int(nbytes[j])) for j in order.tolist()],
            ADVISE_GAP,
        )
        for sel_list in passes:
            sel = np.array(sel_list, dtype=np.int64)
            got = read_host(
                reader.src.fd,
                path,
                ptrs[sel],
                nbytes[sel],
                offsets[sel],
                threads=threads,
                checksum=verify,
                hugepages=hugepages(),
            )
            if verify:

                def label(j: int, sel: np.ndarray = sel) -> str:
                    return repr(batch.labels[int(sel[j])])

                check_checksums(
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
