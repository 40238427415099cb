"""torch.distributed.checkpoint storage plugin: one tensorfile per rank, JSON metadata, atomic commit.

Usage::

    import torch.distributed.checkpoint as dcp
    import tensorfile.dcp

    dcp.save(state_dict, storage_writer=tensorfile.dcp.StorageWriter("ckpt/step100"))
    dcp.load(state_dict, storage_reader=tensorfile.dcp.StorageReader("ckpt/step100"))

The layout on disk, the commit protocol and what a crash leaves behind are described
in docs/dcp.md. torch.distributed is imported on first use of a name that needs it, so
`clean` (and `tensorfile clean`) start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._clean import clean
from ._common import METADATA_NAME, IncompleteCheckpointError

if TYPE_CHECKING:
    from ._convert import dcp_to_state_dict, state_dict_to_dcp
    from ._export import convert_checkpoint, describe_checkpoint, verify_checkpoint
    from ._reader import StorageReader
    from ._record import read_metadata
    from ._writer import StorageWriter

_LAZY = {
    "StorageReader": "._reader",
    "read_metadata": "._record",
    "StorageWriter": "._writer",
    "dcp_to_state_dict": "._convert",
    "state_dict_to_dcp": "._convert",
    "convert_checkpoint": "._export",
    "describe_checkpoint": "._export",
    "verify_checkpoint": "._export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorfile.dcp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "METADATA_NAME",
    "IncompleteCheckpointError",
    "StorageReader",
    "StorageWriter",
    "clean",
    "convert_checkpoint",
    "dcp_to_state_dict",
    "describe_checkpoint",
    "read_metadata",
    "state_dict_to_dcp",
    "verify_checkpoint",
]
