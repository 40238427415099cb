"""A checkpoint directory as one file (tensorfile or safetensors), written as it is read,
one tensor at a time through a bounded buffer; and what `tensorfile inspect` and
`tensorfile verify` say about a directory."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .. import _engine, _files, _io
from .._errors import FormatError
from .._tree import Flattener, no_gc
from ..formats import TensorRow, native, safetensors
from ._assemble import SLAB_NBYTES, Checkpoint, Sink
from ._common import (
    BLOCK_NBYTES,
    METADATA_NAME,
    STOCK_METADATA_NAME,
    contiguous_strides,
    open_inside,
)
from ._convert import nest

Progress = Callable[[int], None]


def _nothing(_: int) -> None:
    pass


class _FileSink(Sink):
    """Writes each filled step to `fd` at `file_offset` + its offset, through one reused
    buffer; keeps the CRC32C of everything written so far."""

    def __init__(self, fd: int, path: str, buf: np.ndarray, threads: int, progress: Progress):
        self.fd, self.path, self.buf, self.threads, self.progress = fd, path, buf, threads, progress
        self.file_offset = 0
        self.crc = 0

    def start(self, file_offset: int) -> None:
        self.file_offset = file_offset
        self.crc = 0

    def target(self, offset: int, nbytes: int) -> np.ndarray:
        return self.buf[:nbytes]

    def done(self, offset: int, view: np.ndarray) -> None:
        (got,) = _io.write_host(
            self.fd,
            self.path,
            [view.ctypes.data],
            [len(view)],
            [self.file_offset + offset],
            threads=self.threads,
            checksum=True,
            writeback=True,
        ).tolist()
        self.crc = (
            int(got) if offset == 0 else _engine.crc32c_combine(self.crc, int(got), len(view))
        )
        self.progress(len(view))


def _graph(ck: Checkpoint) -> tuple[Any, dict[int, str]]:
    """The state dict as dcp_to_state_dict returns it, with a meta tensor standing in for
    each checkpoint tensor (BYTE_IO values are read, they are small); returns it and
    {id(stand-in): fqn}."""
    flat: dict[str, Any] = {}
    stand: dict[int, str] = {}
    for fqn, sm in ck.md.state_dict_metadata.items():
        if isinstance(sm, TensorStorageMetadata):
            t = torch.empty(0, device="meta")
            stand[id(t)] = fqn
            flat[fqn] = t
        else:
            flat[fqn] = ck.value(fqn)
    mappings = ck.mappings()
    return (flat if mappings is None else nest(flat, mappings)), stand


def convert_checkpoint(
    src: str,
    dst: str,
    to: str,
    progress: Progress = _nothing,
    *,
    skip_non_tensors: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Writes checkpoint directory `src` (this plugin's or torch's FileSystemWriter's) as
    one tensorfile or safetensors file `dst`, atomically, one tensor at a time: memory is
    the streaming buffers (a few times SLAB_NBYTES) plus the non-tensor values, whatever
    the checkpoint's size. Every checksum of the source is checked on the way."""
    with no_gc(), Checkpoint(src, num_threads=num_threads) as ck:
        graph, stand = _graph(ck)
        if to == "tensorfile":
            skipped: list[str] = []
            _to_native(ck, graph, stand, dst, progress)
        elif to == "safetensors":
            skipped = _to_safetensors(ck, graph, stand, dst, progress, skip_non_tensors)
        else:
            raise ValueError(f"unknown target format {to!r}")
        return {"from": f"dcp ({ck.kind})", "to": to, "skipped": skipped}


def _to_native(
    ck: Checkpoint, graph: Any, stand: dict[int, str], dst: str, progress: Progress
) -> None:
    flat = Flattener()
    tree = flat.flatten(graph)
    sdm = dict(ck.tensors())
    rows: list[TensorRow] = []
    sizes: list[int] = []
    sources: list[str | torch.Tensor] = []  # a tensor to assemble, or one in memory
    for j, leaf in enumerate(flat.leaves):
        fqn = stand.get(id(leaf))
        if fqn is not None:
            sm = sdm[fqn]
            dtype, shape = sm.properties.dtype, list(sm.size)
            sources.append(fqn)
        elif isinstance(leaf, torch.Tensor):  # inside a BYTE_IO value
            leaf = leaf.detach().cpu().contiguous()
            dtype, shape = leaf.dtype, list(leaf.shape)
            sources.append(leaf)
        else:
            raise FormatError(f"{ck.where}: a value holds a {type(leaf).__name__}")
        rows.append(
            TensorRow(
                "torch",
                j,
                str(dtype).removeprefix("torch."),
                shape,
                contiguous_strides(shape),
                0,
                0,
            )
        )
        sizes.append(math.prod(shape) * dtype.itemsize)
    offs = native.storage_offsets(sizes)
    header, crc_pos = native.encode_header(
        tree,
        native.TensorTable.from_rows(rows),
        np.array(offs, dtype=np.uint64),
        np.array(sizes, dtype=np.uint64),
        ["cpu"] * len(sizes),
        {},
    )
    if len(header) > native.MAX_HEADER_NBYTES:
        raise ValueError(f"{ck.where}: the converted header would exceed the format's limit")
    total = native.file_nbytes(len(header), offs, sizes)
    base = native.data_start(len(header))
    crcs = np.zeros(len(sizes), dtype=np.uint32)
    with _files.atomic_file(dst, total, True) as fd:
        sink = _FileSink(fd, dst, np.empty(SLAB_NBYTES, dtype=np.uint8), ck.threads, progress)
        for j, source in enumerate(sources):
            if not sizes[j]:
                continue
            if isinstance(source, str):
                sink.start(base + offs[j])
                ck.assemble(source, sink)
                crcs[j] = sink.crc
            else:
                (crcs[j],) = _io.write_host(
                    fd, dst, [source.data_ptr()], [sizes[j]], [base + offs[j]], threads=ck.threads
                ).tolist()
                progress(sizes[j])
        native.set_checksums(header, crc_pos, crcs)
        _files.pwrite_all(fd, native.make_preamble(header, total) + bytes(header), 0)


def _leaves(graph: Any) -> tuple[list[tuple[str, Any]], list[str]]:
    """(key path, tensor or stand-in) of every tensor, and the key paths of other values."""
    tensors: list[tuple[str, Any]] = []
    plain: list[str] = []
    stack: list[tuple[Any, str]] = [(graph, "")]
    while stack:
        node, p = stack.pop()
        if isinstance(node, torch.Tensor):
            tensors.append((p, node))
        elif isinstance(node, dict):
            stack.extend((v, f"{p}.{k}" if p else str(k)) for k, v in node.items())
        elif type(node) in (list, tuple):
            stack.extend((v, f"{p}.{i}" if p else str(i)) for i, v in enumerate(node))
        else:
            plain.append(p or "<root>")
    return tensors, plain


def _to_safetensors(
    ck: Checkpoint,
    graph: Any,
    stand: dict[int, str],
    dst: str,
    progress: Progress,
    skip_plain: bool,
) -> list[str]:
    tensors, plain = _leaves(graph)
    if plain and not skip_plain:
        raise ValueError(
            f"{ck.directory}: safetensors holds only tensors; these values are not "
            f"({', '.join(sorted(plain)[:5])}); pass --skip-non-tensors to leave them out"
        )
    sdm = dict(ck.tensors())
    meta = []  # (-itemsize, name, dtype name, shape, nbytes, source)
    for name, leaf in tensors:
        fqn = stand.get(id(leaf))
        if fqn is not None:
            sm = sdm[fqn]
            dtype, shape, source = sm.properties.dtype, list(sm.size), fqn
        else:
            source = leaf.detach().cpu().contiguous()
            dtype, shape = source.dtype, list(source.shape)
        dname = str(dtype).removeprefix("torch.")
        if dname not in safetensors.NAME_OF:
            raise ValueError(
                f"{ck.directory}: {name!r} has dtype {dname}, which safetensors cannot hold"
            )
        meta.append(
            (-dtype.itemsize, name, dname, shape, math.prod(shape) * dtype.itemsize, source)
        )
    meta.sort(key=lambda m: (m[0], m[1]))
    head, rel = safetensors.encode_header([(m[1], m[2], m[3], m[4]) for m in meta], None)
    total = len(head) + sum(m[4] for m in meta)
    with _files.atomic_file(dst, total, True) as fd:
        sink = _FileSink(fd, dst, np.empty(SLAB_NBYTES, dtype=np.uint8), ck.threads, progress)
        for m, r in zip(meta, rel):
            source = m[5]
            if not m[4]:
                continue
            if isinstance(source, str):
                sink.start(len(head) + r)
                ck.assemble(source, sink)
            else:
                _io.write_host(
                    fd, dst, [source.data_ptr()], [m[4]], [len(head) + r], threads=ck.threads
                )
                progress(m[4])
        _files.pwrite_all(fd, head, 0)
    return sorted(plain) if plain else []


# --------------------------------------------------------------------------- inspect, verify


def describe_checkpoint(directory: str) -> dict[str, Any]:
    """What `tensorfile inspect DIR` shows, from the commit record alone (checked as a
    load checks it): the writer, the rank files, every tensor with its global shape and
    chunks, the other (BYTE_IO) values, the planner's data and the storage metadata."""
    with Checkpoint(directory) as ck:
        md = ck.md
        per_file: dict[str, int] = {}
        for info in md.storage_data.values():
            name = info.file if ck.kind == "tensorfile" else info.relative_path
            per_file[name] = per_file.get(name, 0) + 1
        tensors = []
        for fqn, sm in ck.tensors():
            tensors.append(
                {
                    "key": fqn,
                    "dtype": str(sm.properties.dtype).removeprefix("torch."),
                    "shape": list(sm.size),
                    "nbytes": math.prod(sm.size) * sm.properties.dtype.itemsize,
                    "chunks": [[list(c.offsets), list(c.sizes)] for c in sm.chunks],
                }
            )
        sm_ = md.storage_meta
        return {
            "directory": ck.directory,
            "format": "dcp",
            "writer": "tensorfile.dcp.StorageWriter"
            if ck.kind == "tensorfile"
            else "torch FileSystemWriter",
            "commit_record": METADATA_NAME if ck.kind == "tensorfile" else STOCK_METADATA_NAME,
            "dcp_version": md.version,
            "files": [
                {"name": n, "nbytes": ck.file_nbytes[n], "items": per_file.get(n, 0)}
                for n in sorted(ck.file_nbytes)
            ],
            "tensors": tensors,
            "values": ck.byte_items(),
            "planner_data": "mappings"
            if ck.mappings() is not None
            else type(md.planner_data).__name__,
            "storage_meta": None
            if sm_ is None
            else {
                "checkpoint_id": None
                if sm_.checkpoint_id is None
                else os.fspath(sm_.checkpoint_id),
                "save_id": sm_.save_id,
            },
        }


def verify_checkpoint(
    directory: str, progress: Progress = _nothing, num_threads: int | None = None
) -> dict[str, Any]:
    """Checks a checkpoint directory completely: the commit record (as a load does), every
    rank file (structure, padding, every checksum: tensorfile's `verify`), that each
    chunk the record names is in its rank file with the recorded dtype, shape and bytes,
    that the per-block checksums agree with the data, and that every BYTE_IO value reads.
    A stock checkpoint's items are each parsed and checked against their zip CRC-32s.
    Raises FormatError/ChecksumError naming the file; returns a summary."""
    from .._convert import verify as verify_file

    nbytes = 0
    with Checkpoint(directory, num_threads=num_threads) as ck:
        if ck.kind == "tensorfile":
            for name in sorted(ck.file_nbytes):
                os.close(open_inside(ck.directory, name, ck.where))  # a file inside, no link
                nbytes += verify_file(os.path.join(ck.directory, name), progress, num_threads)[
                    "nbytes"
                ]
        chunks = 0
        for fqn, _sm in ck.tensors():
            for _off, _sz, piece in ck.pieces(fqn):
                chunks += 1
                if ck.kind == "tensorfile":
                    _check_blocks(ck, piece)
                else:
                    nbytes += ck.verify_region(piece, progress)
        for fqn in ck.byte_items():
            ck.value(fqn)
        return {
            "format": f"dcp ({ck.kind})",
            "tensors": len(ck.tensors()),
            "chunks": chunks,
            "values": len(ck.byte_items()),
            "nbytes": nbytes,
        }


def _check_blocks(ck: Checkpoint, piece: Any) -> None:
    """A chunk's per-block checksums must describe its bytes: for a chunk that is its
    whole storage they must combine to the storage's checksum (which verify checked
    against the data); otherwise the blocks are read and checked."""
    if not piece.block_crcs:
        return
    whole = piece.data_offset == piece.region_offset and piece.nbytes == piece.region_nbytes
    if whole:
        crc = 0
        for k, c in enumerate(piece.block_crcs):
            n = min(BLOCK_NBYTES, piece.nbytes - k * BLOCK_NBYTES)
            crc = int(c) if k == 0 else _engine.crc32c_combine(crc, int(c), n)
        if crc == piece.crc:
            return
    buf = np.empty(min(piece.nbytes, SLAB_NBYTES), dtype=np.uint8)
    for a in range(0, piece.nbytes, len(buf)):
        b = min(piece.nbytes, a + len(buf))
        ck.read_blocks(piece, a, b, buf[: b - a])
