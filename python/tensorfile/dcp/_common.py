"""Names, limits and record types shared by the DCP writer, reader and metadata codec."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import (
    MetadataIndex,
)

from .._errors import FormatError

METADATA_NAME = "tensorfile-dcp.json"
"""The commit record: the checkpoint exists once this file does."""

FORMAT = "tensorfile-dcp"
FORMAT_VERSION = 1
DCP_VERSION = "1.0.0"  # the metadata schema version torch's own writer records

# Storages at least this large get one CRC32C per block besides the file's per-storage
# checksum, so a resharded load can read and verify a slice without reading the rest.
BLOCK_NBYTES = 1 << 20
MAX_METADATA_NBYTES = 1 << 30
# Staging memory one read batch may hold (for destinations we cannot read into directly).
BATCH_STAGING_NBYTES = 256 << 20
# Regions closer than this are advised to the kernel as one run (the padding between
# storages is at most 4 KiB, so a whole file read in order is a single run).
ADVISE_GAP = 64 << 10
DATA_NAME = re.compile(r"^__(\d+)_([0-9a-f]{16})\.tf$")


class IncompleteCheckpointError(FormatError):
    """The directory holds no committed checkpoint: a save started there did not finish,
    or files the metadata lists are missing."""


@dataclass(frozen=True)
class StoragePlan:
    file: str  # the rank's data file, relative to the checkpoint directory


@dataclass(frozen=True)
class Location:
    """Where one write item lives: the tensor at key path `key` of data file `file`."""

    file: str
    key: str
    nbytes: int
    block_crcs: tuple[int, ...] = ()  # CRC32C of each BLOCK_NBYTES block of the tensor's bytes


def metadata_name(rank: int | None) -> str:
    return METADATA_NAME if rank is None else f"__{rank}_{METADATA_NAME}"


def is_local_path(checkpoint_id: Any) -> bool:
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    return "://" not in os.fspath(checkpoint_id)


def item_key(index: MetadataIndex) -> str:
    if index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(map(str, index.offset))}"
