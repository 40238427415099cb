"""The DCP StorageWriter: one tensorfile per rank, block checksums, the atomic commit."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import storage as _storage
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.futures import Future

from .. import api
from .._config import num_threads as resolve_threads
from .._files import atomic_file, clean, pwrite_all
from .._io import checksum_host
from . import _objects
from ._clean import hold, release, remove_dead
from ._common import (
    BLOCK_NBYTES,
    DCP_VERSION,
    IncompleteCheckpointError,
    Location,
    StoragePlan,
    is_local_path,
    item_key,
    metadata_name,
)
from ._metadata import encode_metadata

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

    `path` may be an object URL (``s3://bucket/prefix``, gs://, az://): each rank's file
    is then one object, uploaded from the tensors' memory, and the commit record one PUT
    written last (docs/dcp.md, "Object stores"). `storage_options` configures the store
    (see tensorfile._remote.store_for); `durable` has no effect there.
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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self._set_path(path)
        self.durable = sync_files if durable is None else durable
        self.num_threads = num_threads if num_threads is not None else thread_count
        if self.num_threads is not None:
            resolve_threads(self.num_threads)  # validates
        self.overwrite = overwrite
        self.save_id = secrets.token_hex(8)
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True

    def _set_path(self, path: str | os.PathLike[str]) -> None:
        self.target = _objects.object_target(path)
        if self.target is not None and self.target.kind == "http":
            raise ValueError(f"{self.target.url}: http(s) URLs are read-only; save elsewhere")
        self.path = self.target.url if self.target is not None else _objects.local_path(path)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(
        self, checkpoint_id: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any
    ) -> None:
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.save_id = secrets.token_hex(8)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan, *args: Any, **kwargs: Any) -> SavePlan:
        if self.target is None:
            os.makedirs(self.path, exist_ok=True)
        if not self.overwrite:
            own = metadata_name(None if self.use_collectives else self.rank)
            if (
                os.path.exists(os.path.join(self.path, own))
                if self.target is None
                else _objects.exists(self.target.child(own), self.storage_options)
            ):
                raise FileExistsError(
                    17,
                    f"tensorfile.dcp: {self.path} already holds a checkpoint and overwrite=False",
                    self.path,
                )
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(
                plan, storage_data=StoragePlan(f"__{self.rank}_{self.save_id}.tf")
            )
        return plan

    def prepare_global_plan(
        self, plans: list[SavePlan], *args: Any, **kwargs: Any
    ) -> list[SavePlan]:
        # One save id for every rank's file: the coordinator's, so the names of one save
        # never collide with the files of the checkpoint they replace.
        return [
            dataclasses.replace(p, storage_data=StoragePlan(f"__{i}_{self.save_id}.tf"))
            if p.storage_data is None
            else p
            for i, p in enumerate(plans)
        ]

    def write_data(
        self, plan: SavePlan, planner: SavePlanner, *args: Any, **kwargs: Any
    ) -> Future[list[_storage.WriteResult]]:
        sp = plan.storage_data
        if not isinstance(sp, StoragePlan):
            raise TypeError(
                "tensorfile.dcp.StorageWriter.write_data: the plan was not prepared by this "
                f"writer (storage_data is {type(sp).__name__})"
            )
        tensors: dict[str, torch.Tensor] = {}
        results: list[_storage.WriteResult] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = item_key(item.index)
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
        if tensors and self.target is not None:
            # One multipart upload, each part checked against the header's checksums as
            # it goes up (a tensor changed meanwhile aborts it).
            api.save(
                tensors,
                self.target.child(sp.file).url,
                num_threads=self.num_threads,
                storage_options=self.storage_options,
            )
        elif tensors:  # a rank the planner gave nothing to write leaves no file
            # Held until the commit: `tensorfile clean` leaves the file of a live save alone.
            hold(self.path, sp.file)
            try:
                api.save(
                    tensors,
                    os.path.join(self.path, sp.file),
                    durable=self.durable,
                    num_threads=self.num_threads,
                )
            except BaseException:
                release(self.path, [sp.file], remove=False)
                raise
        for item in plan.items:
            key = item_key(item.index)
            t = tensors[key]
            nbytes = t.numel() * t.element_size()
            results.append(
                _storage.WriteResult(
                    index=item.index,
                    size_in_bytes=nbytes,
                    storage_data=Location(sp.file, key, nbytes, block_crcs.get(key, ())),
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
        storage_md: dict[MetadataIndex, Location] = {}
        for wr_list in results:
            for wr in wr_list:
                storage_md[wr.index] = wr.storage_data
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        metadata.version = DCP_VERSION
        files = sorted({loc.file for loc in storage_md.values()})
        sizes = {}
        listed = _objects.object_sizes(self.target, self.storage_options) if self.target else {}
        for name in files:
            try:
                sizes[name] = (
                    listed[name]
                    if self.target is not None
                    else os.stat(os.path.join(self.path, name)).st_size
                )
            except (FileNotFoundError, KeyError):
                raise IncompleteCheckpointError(
                    f"{self.path}: rank file {name} is missing at commit time; the checkpoint was not committed"
                ) from None
        doc = encode_metadata(metadata, sizes)
        rank = None if self.use_collectives else self.rank
        if self.target is not None:
            blob = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
            _objects.commit(self.target, metadata_name(rank), blob, self.storage_options)
            _objects.remove_replaced(self.target, set(files), rank, self.storage_options)
            return
        _commit(self.path, metadata_name(rank), doc, self.durable)
        release(self.path, files, remove=True)
        _remove_replaced(self.path, set(files), rank)

    @classmethod
    def validate_checkpoint_id(
        cls, checkpoint_id: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> bool:
        return is_local_path(checkpoint_id)


def _block_checksums(
    tensors: dict[str, torch.Tensor], num_threads: int | None
) -> dict[str, tuple[int, ...]]:
    """CRC32C per BLOCK_NBYTES block of each large CPU tensor, in one parallel pass."""
    keys: list[str] = []
    counts: list[int] = []
    ptrs: list[int] = []
    sizes: list[int] = []
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes < 2 * BLOCK_NBYTES or t.device.type != "cpu":
            continue
        base = t.data_ptr()
        n = math.ceil(nbytes / BLOCK_NBYTES)
        for k in range(n):
            ptrs.append(base + k * BLOCK_NBYTES)
            sizes.append(min(BLOCK_NBYTES, nbytes - k * BLOCK_NBYTES))
        keys.append(key)
        counts.append(n)
    if not keys:
        return {}
    crcs = checksum_host(ptrs, sizes, threads=resolve_threads(num_threads)).tolist()
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
    (with per-rank commits, only this rank's) that no live save holds, their markers, and
    temporaries of dead writers."""
    try:
        remove_dead(directory, keep, rank)
    except OSError:
        pass
    try:
        clean(directory)
    except OSError:
        pass
