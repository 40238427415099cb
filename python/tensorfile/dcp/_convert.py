"""Whole DCP directories (ours or torch's FileSystemWriter) to one state dict and back."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    TensorStorageMetadata,
)

from .._errors import FormatError
from ._assemble import Checkpoint, MemorySink
from ._writer import StorageWriter


def dcp_to_state_dict(
    path: str | os.PathLike[str], *, nested: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Reads a whole DCP checkpoint directory, written by this plugin or by torch's
    FileSystemWriter, into a state dict of full (unsharded) CPU tensors. Single process,
    no process group needed. With `nested=True` the dict is rebuilt in the shape the
    saver flattened (from the planner's mappings, when recorded); otherwise keys are
    the flat DCP names ("model.layer.weight").

    Memory: the full tensors plus bounded staging (Checkpoint.assemble). Every tensor is
    checked against its checksums (unless verify=False). Non-tensor values are read by
    tensorfile's restricted torch.save reader and the stock metadata by an allow-list
    unpickler, so no code in the checkpoint runs. Nothing outside the directory is opened.
    """
    with Checkpoint(os.fspath(path), verify=verify) as ck:
        flat: dict[str, Any] = {}
        for fqn, sm in ck.md.state_dict_metadata.items():
            if isinstance(sm, TensorStorageMetadata):
                t = torch.empty(sm.size, dtype=sm.properties.dtype)
                ck.assemble(fqn, MemorySink(byte_view(t)))
                flat[fqn] = t
            else:
                flat[fqn] = ck.value(fqn)
        mappings = ck.mappings()
    if not nested or mappings is None:
        return flat
    return nest(flat, mappings)


def byte_view(t: torch.Tensor) -> Any:
    """The bytes of contiguous CPU tensor `t` as a writable uint8 numpy array."""
    return t.reshape(-1).view(torch.uint8).numpy()


def nest(flat: dict[str, Any], mappings: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """The nested state dict that DCP flattened into `flat`, rebuilt from the planner's
    {fqn: key path} mappings (checked when the metadata was read)."""
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        _set_path(out, mappings.get(fqn, (fqn,)), value)
    return out


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
