"""A whole checkpoint directory (this plugin's or torch's FileSystemWriter's) read one
tensor at a time: each full tensor is assembled from its saved chunks through bounded
buffers, every byte checked against the checksum that covers it. Behind
dcp_to_state_dict, and convert, verify and inspect of a directory."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from .. import _config, _engine, _io
from .._errors import FormatError
from ._common import (
    BLOCK_NBYTES,
    METADATA_NAME,
    STOCK_METADATA_NAME,
    Location,
    contiguous_strides,
    open_inside,
)
from ._record import missing_metadata, open_native, read_metadata

SLAB_NBYTES = 32 << 20  # the assembled bytes of one step, and the staging beside them
_REMEDY = "re-save the checkpoint, or read it with verify=False"


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Piece:
    """Where the bytes of one saved chunk are, and the checksummed region holding them."""

    file: str  # its file's name in the checkpoint directory
    data_offset: int  # file offset of the chunk's first byte
    nbytes: int
    region_offset: int  # the storage (or zip record) the checksum covers
    region_nbytes: int
    crc: int  # -1: no checksum
    crc_kind: str  # "crc32c" or "crc32" (zip)
    block_crcs: tuple[int, ...]  # CRC32C per BLOCK_NBYTES from data_offset (this plugin)
    label: str  # the item's key, for messages


class Sink:
    """Where assemble puts a tensor's bytes: `target(offset, nbytes)` gives the uint8
    array to fill with bytes [offset, offset + nbytes) of the tensor, `done(offset, view)`
    is called once it is filled. Calls come in increasing offset order and cover the
    tensor exactly once."""

    def target(self, offset: int, nbytes: int) -> np.ndarray:
        raise NotImplementedError

    def done(self, offset: int, view: np.ndarray) -> None:
        pass


class MemorySink(Sink):
    def __init__(self, dest: np.ndarray) -> None:
        self.dest = dest

    def target(self, offset: int, nbytes: int) -> np.ndarray:
        return self.dest[offset : offset + nbytes]


class Checkpoint:
    """An open checkpoint directory: its checked metadata, and reads of its chunks. The
    directory is the only place anything is opened: every file is opened with
    open_inside (no link, no name outside it). Not thread-safe; close() when done."""

    def __init__(self, directory: str, *, verify: bool = True, num_threads: int | None = None):
        self.directory = os.fspath(directory)
        self.verify = verify
        self.threads = _config.num_threads(num_threads)
        if os.path.lexists(os.path.join(self.directory, METADATA_NAME)):
            self.kind = "tensorfile"
            self.md, self.file_nbytes = read_metadata(self.directory)
            self.where = os.path.join(self.directory, METADATA_NAME)
        elif os.path.lexists(os.path.join(self.directory, STOCK_METADATA_NAME)):
            from ._stock import read_stock_metadata

            self.kind = "torch"
            self.md, self.file_nbytes = read_stock_metadata(self.directory)
            self.where = os.path.join(self.directory, STOCK_METADATA_NAME)
        else:
            raise missing_metadata(self.directory, METADATA_NAME)
        self._readers: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._cursor: dict[Piece, tuple[int, int]] = {}
        self._whole: dict[Piece, np.ndarray] = {}
        self._stage = np.empty(0, dtype=np.uint8)

    # ------------------------------------------------------------------ what it holds

    def tensors(self) -> list[tuple[str, TensorStorageMetadata]]:
        sdm = self.md.state_dict_metadata
        return [(k, v) for k, v in sdm.items() if isinstance(v, TensorStorageMetadata)]

    def byte_items(self) -> list[str]:
        sdm = self.md.state_dict_metadata
        return [k for k, v in sdm.items() if isinstance(v, BytesStorageMetadata)]

    def mappings(self) -> dict[str, tuple[Any, ...]] | None:
        pd = self.md.planner_data
        if type(pd) is dict and pd and all(type(p) is tuple for p in pd.values()):
            return pd
        return None

    # ------------------------------------------------------------------ files

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            if self.kind == "tensorfile":
                fd = self._native(name).src.fd
            else:
                fd = self._fds[name] = open_inside(self.directory, name, self.where)
        return fd

    def _native(self, name: str) -> Any:
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = open_native(self.directory, name, self.verify)
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        for name, fd in self._fds.items():
            if name not in self._readers:
                os.close(fd)
        self._readers.clear()
        self._fds.clear()
        self._whole.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ pieces

    def pieces(self, fqn: str) -> list[tuple[tuple[int, ...], tuple[int, ...], Piece]]:
        """(offsets, sizes, piece) of each non-empty saved chunk of tensor `fqn`."""
        sm = self.md.state_dict_metadata[fqn]
        assert isinstance(sm, TensorStorageMetadata)
        dtype = sm.properties.dtype
        out = []
        for c in sm.chunks:
            if not all(c.sizes):
                continue
            info = self.md.storage_data[MetadataIndex(fqn, c.offsets)]
            piece = self._piece(fqn, info, dtype, tuple(c.sizes))
            out.append((tuple(c.offsets), tuple(c.sizes), piece))
        return out

    def _piece(self, fqn: str, info: Any, dtype: torch.dtype, sizes: tuple[int, ...]) -> Piece:
        if self.kind == "tensorfile":
            assert isinstance(info, Location)
            reader = self._native(info.file)
            path = os.path.join(self.directory, info.file)
            i = reader.key_index().get(info.key)
            if i is None or info.key in reader.ambiguous:
                raise FormatError(
                    f"{path}: no tensor {info.key!r} (the checkpoint metadata and this rank file disagree)"
                )
            row = reader.layout.tensors[i]
            self._check_row(path, info.key, row, dtype, sizes)
            lay = reader.layout
            s = row.storage
            return Piece(
                info.file,
                int(lay.storage_offsets[s]) + row.offset,
                info.nbytes,
                int(lay.storage_offsets[s]),
                int(lay.storage_nbytes[s]),
                int(lay.storage_crcs[s]),
                "crc32c",
                info.block_crcs,
                info.key,
            )
        return self._stock_piece(fqn, info, dtype, sizes)

    def _stock_piece(
        self, fqn: str, info: Any, dtype: torch.dtype, sizes: tuple[int, ...]
    ) -> Piece:
        from .._reader import open_reader
        from ._stock import ItemWindow

        name = f"{os.path.join(self.directory, info.relative_path)}[{info.offset}:+{info.length}]"
        window = ItemWindow(self._fd(info.relative_path), info.offset, info.length, name)
        with open_reader(cast(Any, window), self.verify) as reader:
            lay = reader.layout
            if reader.format != "torch.save" or len(lay.tensors) != 1:
                raise FormatError(
                    f"{name}: the chunk of {fqn!r} is not one tensor saved by torch.save"
                )
            row = lay.tensors[0]
            self._check_row(name, fqn, row, dtype, sizes)
            s = row.storage
            crc = int(lay.storage_crcs[s]) if lay.crc_kind == "crc32" else 0
            return Piece(
                info.relative_path,
                info.offset + int(lay.storage_offsets[s]) + row.offset,
                math.prod(sizes) * dtype.itemsize,
                info.offset + int(lay.storage_offsets[s]),
                int(lay.storage_nbytes[s]),
                crc if crc else -1,  # torch.save writes 0 when told not to compute CRCs
                "crc32",
                (),
                fqn,
            )

    @staticmethod
    def _check_row(
        name: str, key: str, row: Any, dtype: torch.dtype, sizes: tuple[int, ...]
    ) -> None:
        want = str(dtype).removeprefix("torch.")
        contiguous = contiguous_strides(list(sizes))
        if (
            row.kind != "torch"
            or row.dtype != want
            or tuple(row.shape) != sizes
            or any(a != b for a, b, n in zip(row.strides, contiguous, sizes) if n > 1)
        ):
            raise FormatError(
                f"{name}: {key!r} is a {row.dtype} tensor of shape {list(row.shape)} and "
                f"strides {list(row.strides)}; the checkpoint metadata records a contiguous "
                f"{want} chunk of shape {list(sizes)}"
            )

    # ------------------------------------------------------------------ byte reads

    def _pread(self, piece: Piece, offset: int, dst: np.ndarray, checksum: bool) -> int:
        return int(
            _io.read_host(
                self._fd(piece.file),
                os.path.join(self.directory, piece.file),
                [dst.ctypes.data],
                [len(dst)],
                [offset],
                threads=self.threads,
                checksum=checksum,
                zip_crc=piece.crc_kind == "crc32",
            )[0]
        )

    def _check(self, piece: Piece, got: int, want: int) -> None:
        _io.check_checksums(
            os.path.join(self.directory, piece.file),
            np.array([got]),
            np.array([want]),
            lambda _j: repr(piece.label),
            piece.crc_kind,
            _REMEDY,
        )

    def read(self, piece: Piece, a: int, b: int, dst: np.ndarray) -> None:
        """Reads bytes [a, b) of a chunk into `dst` (contiguous uint8), checked: read in
        order, a chunk that is its whole storage is checked once its last byte is in;
        otherwise the 1 MiB blocks covering the range are, or the whole storage."""
        if b <= a:
            return
        if not self.verify or (piece.crc < 0 and not piece.block_crcs):
            self._pread(piece, piece.data_offset + a, dst, False)
            return
        whole = piece.data_offset == piece.region_offset and piece.nbytes == piece.region_nbytes
        at, crc = self._cursor.get(piece, (0, 0))
        if whole and piece.crc >= 0 and a == at:
            got = self._pread(piece, piece.data_offset + a, dst, True)
            if a:
                combine = (
                    _engine.crc32_zip_combine
                    if piece.crc_kind == "crc32"
                    else _engine.crc32c_combine
                )
                got = combine(crc, got, b - a)
            if b == piece.nbytes:
                self._cursor.pop(piece, None)
                self._check(piece, got, piece.crc)
            else:
                self._cursor[piece] = (b, got)
            return
        if piece.block_crcs:
            self.read_blocks(piece, a, b, dst)
            return
        region = self._whole.get(piece)
        if region is None:
            if sum(len(r) for r in self._whole.values()) > 2 * SLAB_NBYTES:
                self._whole.clear()
            region = np.empty(piece.region_nbytes, dtype=np.uint8)
            got = self._pread(piece, piece.region_offset, region, True)
            self._check(piece, got, piece.crc)
            self._whole[piece] = region
        start = piece.data_offset - piece.region_offset
        dst[:] = region[start + a : start + b]

    def read_blocks(self, piece: Piece, a: int, b: int, dst: np.ndarray) -> None:
        """Reads bytes [a, b) of a chunk with per-block checksums, checking every block
        the range touches (those at its edges are read whole into a small buffer)."""
        first, last = a // BLOCK_NBYTES, -(-b // BLOCK_NBYTES)
        lo = first * BLOCK_NBYTES
        hi = min(last * BLOCK_NBYTES, piece.nbytes)
        span = np.empty(hi - lo, dtype=np.uint8) if (lo, hi) != (a, b) else dst
        ptrs, sizes, offs = [], [], []
        for k in range(first, last):
            blo = k * BLOCK_NBYTES
            n = min(BLOCK_NBYTES, piece.nbytes - blo)
            ptrs.append(span.ctypes.data + blo - lo)
            sizes.append(n)
            offs.append(piece.data_offset + blo)
        got = _io.read_host(
            self._fd(piece.file),
            os.path.join(self.directory, piece.file),
            ptrs,
            sizes,
            offs,
            threads=self.threads,
            checksum=True,
        )
        want = np.array(piece.block_crcs[first:last], dtype=np.int64)
        _io.check_checksums(
            os.path.join(self.directory, piece.file),
            got,
            want,
            lambda _j: repr(piece.label),
            "crc32c",
            _REMEDY,
        )
        if span is not dst:
            dst[:] = span[a - lo : b - lo]

    def verify_region(self, piece: Piece, progress: Callable[[int], None]) -> int:
        """Reads the whole checksummed region holding a chunk, in steps, and checks it;
        returns its byte count."""
        if piece.crc < 0:
            return 0
        if len(self._stage) < SLAB_NBYTES:
            self._stage = np.empty(SLAB_NBYTES, dtype=np.uint8)
        combine = _engine.crc32_zip_combine if piece.crc_kind == "crc32" else _engine.crc32c_combine
        crc = 0
        for a in range(0, piece.region_nbytes, SLAB_NBYTES):
            n = min(SLAB_NBYTES, piece.region_nbytes - a)
            got = self._pread(piece, piece.region_offset + a, self._stage[:n], True)
            crc = got if a == 0 else combine(crc, got, n)
            progress(n)
        self._check(piece, crc, piece.crc)
        return piece.region_nbytes

    # ------------------------------------------------------------------ BYTE_IO values

    def value(self, fqn: str) -> Any:
        """The BYTE_IO value `fqn`, unpickled by tensorfile's restricted reader of
        torch.save files (DCP stores these values with torch.save); no code runs."""
        from ..api import load

        info = self.md.storage_data[MetadataIndex(fqn)]
        if self.kind == "tensorfile":
            reader = self._native(info.file)
            path = os.path.join(self.directory, info.file)
            i = reader.key_index().get(info.key)
            if i is None or info.key in reader.ambiguous:
                raise FormatError(
                    f"{path}: no item {info.key!r} (the metadata and this rank file disagree)"
                )
            self._check_row(path, info.key, reader.layout.tensors[i], torch.uint8, (info.nbytes,))
            s = reader.layout.tensors[i].storage
            lay = reader.layout
            piece = Piece(
                info.file,
                int(lay.storage_offsets[s]) + reader.layout.tensors[i].offset,
                info.nbytes,
                int(lay.storage_offsets[s]),
                int(lay.storage_nbytes[s]),
                int(lay.storage_crcs[s]),
                "crc32c",
                (),
                info.key,
            )
            raw = np.empty(info.nbytes, dtype=np.uint8)
            self.read(piece, 0, info.nbytes, raw)
            name = f"{path}[{info.key!r}]"
        else:
            raw = np.empty(info.length, dtype=np.uint8)
            piece = Piece(
                info.relative_path,
                info.offset,
                info.length,
                info.offset,
                info.length,
                -1,
                "crc32",
                (),
                fqn,
            )
            self.read(piece, 0, info.length, raw)  # the stock writer checksums nothing
            name = (
                f"{os.path.join(self.directory, info.relative_path)}[{info.offset}:+{info.length}]"
            )
        stream = io.BytesIO(raw.tobytes())
        stream.name = name
        try:
            return load(stream, map_location="cpu", verify=self.verify)
        except FormatError as e:
            raise FormatError(f"{name}: the value of {fqn!r}: {e}") from None

    # ------------------------------------------------------------------ whole tensors

    def assemble(self, fqn: str, sink: Sink) -> None:
        """Streams tensor `fqn`, row-major and contiguous, into `sink` in steps of at
        most SLAB_NBYTES, each read from the chunks that hold it. Every chunk is read once,
        in order, so its checksum is checked as its last byte arrives."""
        sm = self.md.state_dict_metadata[fqn]
        assert isinstance(sm, TensorStorageMetadata)
        size = tuple(sm.size)
        if not all(size):
            return
        isz = sm.properties.dtype.itemsize
        chunks = [(off, sz, piece, 0) for off, sz, piece in self.pieces(fqn)]
        is_bool = sm.properties.dtype == torch.bool

        def finish(offset: int, view: np.ndarray) -> None:
            if is_bool:
                _io.check_bool_bytes(self.where, repr(fqn), view)
            sink.done(offset, view)

        if not size:
            ((_off, _sz, piece, _b),) = chunks
            view = sink.target(0, isz)
            self.read(piece, 0, isz, view)
            finish(0, view)
            return
        if len(self._stage) < SLAB_NBYTES:
            self._stage = np.empty(SLAB_NBYTES, dtype=np.uint8)
        self._fill(size, isz, chunks, 0, sink, finish)
        self._cursor.clear()
        self._whole.clear()

    def _fill(
        self,
        size: tuple[int, ...],
        isz: int,
        chunks: list[tuple[tuple[int, ...], tuple[int, ...], Piece, int]],
        out_base: int,
        sink: Sink,
        finish: Callable[[int, np.ndarray], None],
    ) -> None:
        """Fills the tensor of `size` at byte `out_base` of the output from `chunks`
        (offsets, sizes, piece, byte of the piece where this sub-tensor's part begins):
        runs of whole rows of dimension 0 when a row fits the step, else row by row."""
        row = math.prod(size[1:]) * isz
        order = sorted(chunks, key=lambda c: c[0][0])
        active: list[Any] = []
        k = 0
        if row > SLAB_NBYTES:
            for i in range(size[0]):
                while k < len(order) and order[k][0][0] <= i:
                    active.append(order[k])
                    k += 1
                active = [c for c in active if c[0][0] + c[1][0] > i]
                sub = [
                    (off[1:], sz[1:], piece, base + (i - off[0]) * math.prod(sz[1:]) * isz)
                    for off, sz, piece, base in active
                ]
                self._fill(size[1:], isz, sub, out_base + i * row, sink, finish)
            return
        step = max(1, SLAB_NBYTES // row)
        for r0 in range(0, size[0], step):
            r1 = min(size[0], r0 + step)
            while k < len(order) and order[k][0][0] < r1:
                active.append(order[k])
                k += 1
            active = [c for c in active if c[0][0] + c[1][0] > r0]
            view = sink.target(out_base + r0 * row, (r1 - r0) * row)
            for off, sz, piece, base in active:
                a0, a1 = max(r0, off[0]), min(r1, off[0] + sz[0])
                crow = math.prod(sz[1:]) * isz
                src = base + (a0 - off[0]) * crow
                n = (a1 - a0) * crow
                if sz[1:] == size[1:]:  # whole rows: contiguous in the output too
                    self.read(piece, src, src + n, view[(a0 - r0) * row : (a1 - r0) * row])
                    continue
                stage = self._stage[:n]
                self.read(piece, src, src + n, stage)
                grid = view.reshape((r1 - r0, *size[1:], isz))
                at = (slice(a0 - r0, a1 - r0), *(slice(o, o + c) for o, c in zip(off[1:], sz[1:])))
                grid[at] = stage.reshape((a1 - a0, *sz[1:], isz))
            finish(out_base + r0 * row, view)
