"""Names, limits, record types and the checks shared by the DCP writer, reader, metadata
codecs and converters. Imports no torch, so `tensorfile clean` stays fast."""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import FormatError
from .._safejson import check_depth

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import MetadataIndex

METADATA_NAME = "tensorfile-dcp.json"
"""The commit record: the checkpoint exists once this file does."""
STOCK_METADATA_NAME = ".metadata"  # torch's FileSystemWriter: a pickle

FORMAT = "tensorfile-dcp"
FORMAT_VERSION = 1
DCP_VERSION = "1.0.0"  # the metadata schema version torch's own writer records

# Storages at least this large get one CRC32C per block besides the file's per-storage
# checksum, so a resharded load can read and verify a slice without reading the rest.
BLOCK_NBYTES = 1 << 20
MAX_METADATA_NBYTES = 1 << 30
# Containers in checkpoint metadata (the stock pickle, planner data values) nest at most
# this deep, as tensorfile's own trees do (_tree.MAX_DEPTH); the JSON record at most
# MAX_JSON_DEPTH (its own few levels around the planner's values).
MAX_DEPTH = 200
MAX_JSON_DEPTH = MAX_DEPTH + 8
# A key path in the planner's mappings has at most this many parts (one per nesting level).
MAX_KEY_PATH = 200
# List indices in the planner's key paths may leave at most this many empty slots in all
# when the nested state dict is rebuilt (DCP drops empty containers inside lists).
MAX_LIST_GAPS = 1 << 16
# Chunks of one tensor that do not form a regular grid are checked on a grid of at most
# this many cells (or 8 per chunk, if more).
MAX_GRID_CELLS = 1 << 22
# Staging memory one read batch may hold (for destinations we cannot read into directly).
BATCH_STAGING_NBYTES = 256 << 20
# Regions closer than this are advised to the kernel as one run (the padding between
# storages is at most 4 KiB, so a whole file read in order is a single run).
ADVISE_GAP = 64 << 10
DATA_NAME = re.compile(r"^__(\d+)_([0-9a-f]{16})\.tf$")
RANK_RECORD_NAME = re.compile(r"^__(\d+)_" + re.escape(METADATA_NAME) + "$")


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


def contiguous_strides(shape: list[int]) -> list[int]:
    """Row-major strides, in elements, of a tensor of `shape`."""
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * max(shape[d + 1], 1)
    return out


# --------------------------------------------------------------------------- files inside


def open_inside(directory: str, relative: str, where: str) -> int:
    """Opens `relative`, a file inside checkpoint `directory`, for reading, never leaving
    the directory: absolute names, `..`, empty parts and symbolic links (in any part) are
    refused with a FormatError naming `where`, and so is anything but a regular file.
    Each part is opened relative to its parent's descriptor with O_NOFOLLOW, so nothing
    the directory holds can redirect the open. Returns the descriptor (the caller closes it)."""
    parts = relative.split("/")
    if (
        not relative
        or os.path.isabs(relative)
        or "\\" in relative
        or "\0" in relative
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise FormatError(
            f"{where}: names the file {relative!r}, which is not inside the directory"
        )
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        parent = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | cloexec)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, f"tensorfile.dcp: no checkpoint directory {directory}", directory
        ) from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | nofollow | cloexec
            flags |= os.O_NONBLOCK if last else getattr(os, "O_DIRECTORY", 0)  # a FIFO never blocks
            try:
                fd = os.open(part, flags, dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EMLINK):
                    raise FormatError(
                        f"{where}: {relative!r} is a symbolic link or passes through one; "
                        "a checkpoint's files must be inside its directory"
                    ) from None
                if e.errno == errno.ENOTDIR:
                    raise FormatError(
                        f"{where}: {relative!r} is not a file in the directory"
                    ) from None
                raise
            os.close(parent)
            parent = fd
        st = os.fstat(parent)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{where}: {relative!r} is not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(parent, True)
        fd, parent = parent, -1
        return fd
    finally:
        if parent >= 0:
            os.close(parent)


def same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_rank_reader(directory: str, name: str, verify: bool, where: str | None = None) -> Any:
    """tensorfile's reader over rank file `name` of `directory`, after open_inside has
    shown that the name is a regular file inside the directory; the reader's descriptor
    must be that same file, so a name swapped for a link in between is refused."""
    from .._reader import open_reader

    path = os.path.join(directory, name)
    fd = open_inside(directory, name, where or path)
    try:
        reader = open_reader(path, verify)
        try:
            if reader.src.fd is None or not same_file(fd, reader.src.fd):
                raise FormatError(f"{path}: the file changed while it was being opened")
        except BaseException:
            reader.close()
            raise
        return reader
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- JSON depth


def check_json_depth(blob: bytes, limit: int, where: str) -> None:
    """Refuses JSON text whose arrays and objects nest deeper than `limit`, before any
    parser sees it (the one depth rule, tensorfile._safejson)."""
    check_depth(blob, name=where, max_depth=limit)


# --------------------------------------------------------------------------- chunks


def check_tiling(
    size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> None:
    """Raises ValueError unless the chunks (offsets, sizes) lie inside a tensor of `size`
    and cover every element of it exactly once, as every DCP save plan does. Empty chunks
    are allowed anywhere inside. The check works on the grid that the chunks' edges cut
    the tensor into, so a regular sharding costs one cell per chunk."""
    ndim = len(size)
    if len(chunks) == 1 and chunks[0][1] == size and not any(chunks[0][0]):
        return  # one chunk, the whole tensor: the usual unsharded case
    for off, sz in chunks:
        if len(off) != ndim or len(sz) != ndim or any(o + c > n for o, c, n in zip(off, sz, size)):
            raise ValueError(f"chunk {list(off)}+{list(sz)} outside {list(size)}")
    full = [(off, sz) for off, sz in chunks if all(sz)]
    if not all(size):
        return  # an empty tensor has nothing to cover
    if ndim == 0:
        if len(full) != 1:
            raise ValueError(f"{len(full)} chunks for a tensor of one element")
        return
    if not full:
        raise ValueError(f"no chunk holds any of its {math.prod(size)} elements")
    if all(sz[1:] == size[1:] and not any(off[1:]) for off, sz in full):
        # Whole rows (a sharding of dimension 0): they must follow one another.
        at = 0
        for off, sz in sorted(full):
            if off[0] != at:
                raise ValueError(
                    "its chunks overlap"
                    if off[0] < at
                    else f"its rows {at}..{off[0]} are uncovered"
                )
            at += sz[0]
        if at != size[0]:
            raise ValueError(f"its rows {at}..{size[0]} are uncovered")
        return
    edges = []
    for d in range(ndim):
        cuts = {0, size[d]}
        for off, sz in full:
            cuts.add(off[d])
            cuts.add(off[d] + sz[d])
        edges.append(np.array(sorted(cuts), dtype=np.int64))
    shape = [len(e) - 1 for e in edges]
    cells = math.prod(shape)
    if cells > max(MAX_GRID_CELLS, 8 * len(full)):
        raise ValueError(
            f"its {len(full)} chunks cut it into {cells} grid cells, more than tensorfile checks"
        )
    spans = []
    total = 0
    for off, sz in full:
        span = [
            (int(np.searchsorted(edges[d], off[d])), int(np.searchsorted(edges[d], off[d] + sz[d])))
            for d in range(ndim)
        ]
        spans.append(span)
        total += math.prod(b - a for a, b in span)
    if total != cells:
        raise ValueError(
            "its chunks overlap or leave part of it uncovered "
            f"({total} grid cells covered, {cells} in the tensor)"
        )
    grid = np.zeros(shape, dtype=np.uint8)
    for span in spans:
        grid[tuple(slice(a, b) for a, b in span)] = 1
    if int(np.count_nonzero(grid)) != cells:
        raise ValueError("its chunks overlap and leave part of it uncovered")
