"""torch.distributed.checkpoint storage plugin: one tensorfile per rank, JSON metadata, atomic commit.

Usage::

    import torch.distributed.checkpoint as dcp
    import tensorfile.dcp

    dcp.save(state_dict, storage_writer=tensorfile.dcp.StorageWriter("ckpt/step100"))
    dcp.load(state_dict, storage_reader=tensorfile.dcp.StorageReader("ckpt/step100"))

The layout on disk, the commit protocol and what a crash leaves behind are described
in docs/dcp.md.
"""

from ._common import METADATA_NAME, IncompleteCheckpointError
from ._convert import dcp_to_state_dict, state_dict_to_dcp
from ._export import convert_checkpoint, describe_checkpoint, verify_checkpoint
from ._reader import StorageReader, read_metadata
from ._writer import StorageWriter

__all__ = [
    "METADATA_NAME",
    "IncompleteCheckpointError",
    "StorageReader",
    "StorageWriter",
    "convert_checkpoint",
    "dcp_to_state_dict",
    "describe_checkpoint",
    "read_metadata",
    "state_dict_to_dcp",
    "verify_checkpoint",
]
