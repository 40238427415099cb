"""Whole DCP directories (ours or torch's FileSystemWriter) to one state dict and back."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import storage as _storage
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from .._errors import FormatError
from ._common import METADATA_NAME
from ._reader import StorageReader, missing_metadata
from ._writer import StorageWriter


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
    raise missing_metadata(path, METADATA_NAME)


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
