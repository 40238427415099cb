"""The one layer that moves storage bytes between files and memory: the only caller of
the engine's read and write entry points. Opens the byte sources (a regular file read
with pread, a stream) and reads a layout's storages on every path
(pread, stream, mmap, CUDA), writes a save plan's storages (host and CUDA), and holds the
one check of each byte rule (stored checksums, zero padding, bool bytes) with its one
error text. Every entry point (load, open, convert, verify, dcp, async_save) comes here."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import itertools
import mmap as _mmap
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from . import _config, _cuda, _engine, _numpy, _remote, _torch
from ._errors import ChecksumError, FormatError
from ._files import O_CLOEXEC, FileLike, atomic_file, phase, pwrite_all
from ._plan import SavePlan, plan_and_encode
from .formats import native

if TYPE_CHECKING:
    from ._reader import Reader
    from .formats import Layout

_STREAM_CHUNK = 8 << 20  # the bounce buffer of a save to a stream (or an object store)
_REMOTE_HEAD_NBYTES = 1 << 20  # the first GET of an object
_FADVISE = hasattr(os, "posix_fadvise")

# --------------------------------------------------------------------------- byte rules

RESAVE = "re-save it, or pass verify=False to read anyway"


def check_checksums(
    name: str,
    got: np.ndarray,
    want: np.ndarray,
    label: Callable[[int], str],
    kind: str = "crc32c",
    remedy: str = RESAVE,
) -> None:
    """Raises ChecksumError for the first region whose computed checksum `got[j]` is not
    the stored `want[j]`. A negative `want` is not checked; for zip CRC-32s ("crc32") a
    stored 0 is not either (torch.save writes 0 when told not to compute CRCs)."""
    w = np.asarray(want, dtype=np.int64)
    bad = np.nonzero((w >= 0) & (np.asarray(got, dtype=np.int64) != w))[0]
    if kind == "crc32":
        bad = bad[w[bad] != 0]
    if len(bad):
        what = "zip CRC-32 checksum" if kind == "crc32" else "checksum"
        raise ChecksumError(
            f"{name}: {label(int(bad[0]))} {what} mismatch (file damaged after it was written); "
            f"{remedy}"
        )


def check_padding(name: str, data: Any, file_offset: int) -> None:
    """The format's padding must be zero: `data` (bytes or a uint8 array) was read from
    `file_offset`. The engine words the same rule the same way (csrc: require_zero)."""
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    nonzero = np.flatnonzero(raw)
    if len(nonzero):
        raise FormatError(
            f"{name}: padding byte at offset {file_offset + int(nonzero[0])} is not zero "
            "(the file is damaged or was not written by tensorfile)"
        )


def check_bool_bytes(name: str, label: Any, raw: Any) -> None:
    """A bool tensor's bytes (a uint8 numpy array or torch tensor) must be 0 or 1."""
    if isinstance(raw, np.ndarray):
        bad = raw.size and int(raw.max()) > 1
    elif raw.is_meta:
        return  # no bytes to look at
    else:
        bad = raw.numel() and bool((raw > 1).any())
    if bad:
        raise FormatError(f"{name}: bool tensor {label} holds bytes other than 0 and 1")


def _u64(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64)


# --------------------------------------------------------------------------- host transfers


def read_host(
    fd: int,
    name: str,
    ptrs: Any,
    nbytes: Any,
    file_offsets: Any,
    *,
    threads: int,
    checksum: bool = False,
    zip_crc: bool = False,
    gaps: tuple[int, int] | None = None,
    hugepages: bool = False,
) -> np.ndarray:
    """Reads sorted, disjoint regions of `fd` into host memory; returns each region's
    CRC32C (zip CRC-32 with `zip_crc`; zeros without `checksum`). With `gaps=(begin,
    end)`, every byte of [begin, end) outside the regions must be zero padding."""
    return _engine.read_regions(
        fd=fd,
        ptrs=_u64(ptrs),
        nbytes=_u64(nbytes),
        file_offsets=_u64(file_offsets),
        num_threads=threads,
        task_nbytes=_config.task_nbytes(),
        checksum=checksum,
        check_gaps=gaps is not None,
        gap_begin=gaps[0] if gaps else 0,
        gap_end=gaps[1] if gaps else 0,
        path=name,
        hugepages=hugepages,
        zip_crc=zip_crc,
    )


def write_host(
    fd: int,
    name: str,
    ptrs: Any,
    nbytes: Any,
    file_offsets: Any,
    *,
    threads: int,
    checksum: bool = True,
    writeback: bool = False,
) -> np.ndarray:
    """Writes sorted, disjoint host regions to `fd`; returns the CRC32C of each region as
    written. `writeback` (for a file about to be fsynced) starts the disk write early."""
    return _engine.write_regions(
        fd=fd,
        ptrs=_u64(ptrs),
        nbytes=_u64(nbytes),
        file_offsets=_u64(file_offsets),
        num_threads=threads,
        task_nbytes=_config.task_nbytes(write=True),
        checksum=checksum,
        path=name,
        writeback=writeback,
    )


def checksum_host(ptrs: Any, nbytes: Any, *, threads: int, zip_crc: bool = False) -> np.ndarray:
    """The CRC32C (or zip CRC-32) of each host region, computed in parallel."""
    return _engine.checksum_regions(
        ptrs=_u64(ptrs),
        nbytes=_u64(nbytes),
        num_threads=threads,
        task_nbytes=_config.task_nbytes(),
        zip_crc=zip_crc,
    )


def gather(src: Any, name: str, offsets: list[int], sizes: list[int]) -> bytes:
    """Sorted, disjoint small ranges of a source, concatenated, in one engine call (a few
    gathered preads) for a file, or one read each for a stream."""
    if not sizes:
        return b""
    if src.fd is None:
        return b"".join(src.read(n, o) for o, n in zip(offsets, sizes))
    nbytes = _u64(sizes)
    buf = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    ptrs = np.concatenate(([0], np.cumsum(nbytes)[:-1])).astype(np.uint64)
    read_host(src.fd, name, ptrs + np.uint64(buf.ctypes.data), nbytes, offsets, threads=1)
    return buf.tobytes()


def raw_view(ptr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


def advise_sequential(fd: int) -> None:
    """A whole file will be read in order: the kernel reads ahead in larger requests."""
    if _FADVISE:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def advise_willneed(fd: int, ranges: Sequence[tuple[int, int]], gap: int) -> None:
    """Tells the kernel the (file_offset, end) ranges about to be read, merging ranges
    closer than `gap`, so cold reads come in large sequential requests."""
    if not _FADVISE:
        return
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    lo = hi = -1
    for at, end in sorted(ranges):
        if at > hi + gap:  # a new run: advise the one before
            if hi > lo:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            lo = at
        hi = max(hi, end)
    if hi > lo:
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)


# --------------------------------------------------------------------------- CUDA transfers


def read_regions_to_device(
    fd: int,
    path: str,
    ptrs: Sequence[int] | np.ndarray,
    nbytes: Sequence[int] | np.ndarray,
    file_offsets: Sequence[int] | np.ndarray,
    device: int,
    *,
    checksum: bool = True,
    zero_ranges: Sequence[tuple[int, int]] = (),
    num_threads: int | None = None,
    gds_path: str | None = None,
    zip_crc: bool = False,
    backend: str = "cuda",
) -> np.ndarray:
    """Reads regions of the open file `fd` into device memory: region i's `nbytes[i]`
    bytes at `file_offsets[i]` land at device address `ptrs[i]` on CUDA device `device`.
    Returns the CRC32C of each region (zip's CRC-32 with `zip_crc`; zeros when not
    `checksum`), in the order given.
    `zero_ranges` are (file_offset, nbytes) ranges that must hold zeros (FormatError
    otherwise). `path` names the file in errors; `gds_path`, when given, lets
    TENSORFILE_GDS read with cuFile through a second, O_DIRECT descriptor of that path.
    The caller owns the destinations and must not use them until this returns; the
    device's pending work is synchronised first. Regions must not overlap. Releases the
    GIL. This is the entry point for every loader that fills CUDA memory from a file."""
    p, n, o = _u64(ptrs), _u64(nbytes), _u64(file_offsets)
    z = sorted((int(a), int(b)) for a, b in zero_ranges if int(b) > 0)
    threads = _config.num_threads(num_threads)
    if backend == "cuda":
        _cuda.synchronize(device)

    def call(gds_fd: int) -> np.ndarray:
        return _engine.device_read_regions(
            backend=backend,
            device=device,
            fd=fd,
            ptrs=p,
            nbytes=n,
            file_offsets=o,
            zero_offsets=_u64([a for a, _ in z]),
            zero_nbytes=_u64([b for _, b in z]),
            num_threads=threads,
            staging_nbytes=_config.staging_nbytes(),
            staging_buffers=_config.staging_buffers(),
            checksum=checksum,
            path=path,
            gds_fd=gds_fd,
            zip_crc=zip_crc,
        )

    # the engine reads in file order and returns each region's CRC in the order given
    return _cuda.transfer(False, path, gds_path if backend == "cuda" else None, call)


def write_regions_from_device(
    fd: int,
    path: str,
    ptrs: Sequence[int] | np.ndarray,
    nbytes: Sequence[int] | np.ndarray,
    file_offsets: Sequence[int] | np.ndarray,
    device: int,
    *,
    num_threads: int | None = None,
    gds_path: str | None = None,
    backend: str = "cuda",
) -> np.ndarray:
    """Writes device memory regions to the open file `fd` (the reverse of
    read_regions_to_device) and returns each region's CRC32C, computed from the bytes
    written. Regions sorted by file offset, not overlapping; the file should be fresh
    (bytes between regions are zeros or holes). Releases the GIL."""
    threads = _config.num_threads(num_threads)
    if backend == "cuda":
        _cuda.synchronize(device)

    def call(gds_fd: int) -> np.ndarray:
        return _engine.device_write_regions(
            backend=backend,
            device=device,
            fd=fd,
            ptrs=_u64(ptrs),
            nbytes=_u64(nbytes),
            file_offsets=_u64(file_offsets),
            num_threads=threads,
            staging_nbytes=_config.staging_nbytes(),
            staging_buffers=_config.staging_buffers(),
            checksum=True,
            path=path,
            gds_fd=gds_fd,
        )

    return _cuda.transfer(True, path, gds_path if backend == "cuda" else None, call)


def zero_ranges(
    offsets: np.ndarray, nbytes: np.ndarray, begin: int, end: int
) -> list[tuple[int, int]]:
    """The file ranges in [begin, end) outside every storage: the format's padding."""
    out = []
    cursor = begin
    for off, nb in sorted(zip(offsets.tolist(), nbytes.tolist())):
        if off > cursor:
            out.append((cursor, off - cursor))
        cursor = max(cursor, off + nb)
    if end > cursor:
        out.append((cursor, end - cursor))
    return out


# --------------------------------------------------------------------------- reading storages


def read_storages(
    reader: Reader,
    which: list[int] | None,
    map_location: Any,
    verify: bool,
    threads: int,
    use_mmap: bool,
    into: dict[int, Any] | None = None,
    whole: bool | None = None,
) -> dict[int, Any]:
    """Reads storages (all when `which` is None, or `whole`: all the file holds itself,
    its padding checked too), checks them, and returns {storage
    index: torch UntypedStorage or numpy uint8 array}; reading them all onto the CPU, a
    _torch.Prebuilt dict where some values are their one tensor. Storages in `into` are
    read straight into the memory of the tensor given for them (CPU or CUDA), which is
    then their value; no destination is allocated for them."""
    lay = reader.layout
    idx = list(range(len(lay.storage_kind))) if which is None else which
    into = dict(into or {})
    meta = _torch.check_devices(reader.name, lay, [s for s in idx if s not in into], map_location)
    if meta:  # made on the meta device, as torch.load makes them: no byte is read
        rest = [s for s in idx if s not in meta]
        out = (
            read_storages(reader, rest, map_location, verify, threads, use_mmap, into, whole)
            if rest
            else {}
        )
        out.update({s: _torch.meta_storage(reader.name, int(lay.storage_nbytes[s])) for s in meta})
        return out
    whole = which is None if whole is None else whole
    if use_mmap:
        if reader.src.fd is None:
            raise ValueError(f"{reader.name}: mmap=True needs a local file")
        if into:
            raise ValueError("tensorfile.load: into= cannot be combined with mmap=True")
        raw = _map_storages(reader, idx, verify, threads, whole)
    elif reader.src.remote is not None:
        into = {s: t for s, t in into.items() if t.is_cpu}  # the rest is copied after the read
        raw = _remote_storages(reader, idx, verify, threads, into)
    elif reader.src.fd is not None:
        direct = _cuda_targets(reader, [s for s in idx if s not in into], map_location)
        direct.update({s: t.device for s, t in into.items() if t.is_cuda})
        if direct:
            return _read_to_cuda(reader, idx, direct, map_location, verify, threads, whole, into)
        prebuild = whole and not reader.pin_memory and _torch.stays_on_cpu(lay, map_location)
        raw = _pread_storages(reader, idx, verify, threads, whole, prebuild, into)
        if prebuild:
            return raw  # every storage's place is where it was read
    else:
        into = {s: t for s, t in into.items() if t.is_cpu}  # the rest is copied after the read
        raw = _stream_storages(reader, idx, verify, threads, whole, into)
    place = _torch.placer(lay, reader.name, map_location)
    return {s: raw[s] if s in into else place(s, raw[s]) for s in idx}


def _allocate(
    reader: Reader, idx: list[int], prebuild: bool = False, into: dict[int, Any] | None = None
) -> tuple[Any, np.ndarray]:
    lay = reader.layout
    into = into or {}
    fresh = [s for s in idx if s not in into]
    if any(lay.storage_kind[s] == "torch" for s in fresh):
        torch = _torch.module(reader.name)
        bufs, got = _torch.allocate(torch, lay, fresh, prebuild, reader.pin_memory)
    else:
        bufs, got = {}, np.zeros(len(fresh), dtype=np.uint64)
    ptr_of = dict(zip(fresh, got.tolist()))
    for s in fresh:
        if lay.storage_kind[s] == "numpy":
            bufs[s], ptr_of[s] = _numpy.allocate(int(lay.storage_nbytes[s]))
    for s in idx:
        if s in into:
            bufs[s] = into[s]
            ptr_of[s] = into[s].data_ptr()
    return bufs, np.array([ptr_of[s] for s in idx], dtype=np.uint64)


def _verify(reader: Reader, idx: list[int], ptrs: np.ndarray, threads: int, crcs: Any) -> None:
    """Checks the stored checksums of storages `idx` now in memory at `ptrs`; `crcs` are
    the checksums the engine computed while reading, if it did."""
    lay = reader.layout
    if lay.crc_kind == "none":
        return
    if crcs is None:
        crcs = checksum_host(
            ptrs, lay.storage_nbytes[idx], threads=threads, zip_crc=lay.crc_kind == "crc32"
        )
    check_storage_crcs(reader, idx, crcs)


def check_storage_crcs(reader: Reader, idx: list[int], got: np.ndarray) -> None:
    lay = reader.layout

    def label(j: int) -> str:
        s = idx[j]
        return f"storage {s} ({', '.join(reader.storage_keys(s)[:4])})"

    check_checksums(reader.name, got, lay.storage_crcs[idx], label, lay.crc_kind)


def _data_begin(lay: Layout) -> int:
    return int(lay.storage_offsets[0]) if len(lay.storage_offsets) else lay.file_nbytes


def _pread_storages(
    reader: Reader,
    idx: list[int],
    verify: bool,
    threads: int,
    whole: bool,
    prebuild: bool = False,
    into: dict[int, Any] | None = None,
) -> dict[int, Any]:
    """Reads storages into fresh memory (or the destinations of `into`); with
    `prebuild`, some values are already the storage's one tensor (see _torch.allocate)
    rather than a storage."""
    lay = reader.layout
    bufs, ptrs = _allocate(reader, idx, prebuild, into)
    fd = reader.src.fd
    assert fd is not None
    nbytes = lay.storage_nbytes[idx]
    full = nbytes > 0  # empty storages have no bytes and no padding: no I/O
    crcs = np.zeros(len(idx), dtype=np.uint32)
    if whole:
        advise_sequential(fd)
    crcs[full] = read_host(
        fd,
        reader.name,
        ptrs[full],
        nbytes[full],
        lay.storage_offsets[idx][full],
        threads=threads,
        checksum=verify and lay.crc_kind != "none",
        zip_crc=lay.crc_kind == "crc32",
        gaps=(_data_begin(lay), lay.file_nbytes) if whole and lay.canonical_gaps else None,
        hugepages=_config.hugepages(),
    )
    if verify:
        _verify(reader, idx, ptrs, threads, crcs)
    return bufs


def _stream_storages(
    reader: Reader,
    idx: list[int],
    verify: bool,
    threads: int,
    whole: bool,
    into: dict[int, Any] | None = None,
) -> dict[int, Any]:
    lay, src = reader.layout, reader.src
    bufs, ptrs = _allocate(reader, idx, False, into)
    pad_check = whole and lay.canonical_gaps
    cursor = min(native.data_start(lay.header_end - native.PREAMBLE_NBYTES), lay.file_nbytes)
    for j, s in enumerate(idx):
        off = int(lay.storage_offsets[s])
        nb = int(lay.storage_nbytes[s])
        if nb == 0:
            continue
        if off > cursor and pad_check:
            pad = src.read(off - cursor, cursor)
            if len(pad) != off - cursor:
                raise FormatError(
                    f"{reader.name}: unexpected end of file at offset {cursor} (truncated)"
                )
            check_padding(reader.name, pad, cursor)
        if src.readinto(raw_view(int(ptrs[j]), nb), off) != nb:
            raise FormatError(f"{reader.name}: unexpected end of file in storage {s} (truncated)")
        cursor = off + nb
    if whole and not src.seekable and src.read(1, src.consumed):
        raise FormatError(f"{reader.name}: trailing bytes after the last storage")
    if verify:
        _verify(reader, idx, ptrs, threads, None)
    return bufs


def _remote_storages(
    reader: Reader,
    idx: list[int],
    verify: bool,
    threads: int,
    into: dict[int, Any] | None = None,
) -> dict[int, Any]:
    """Storages of an object: concurrent ranged GETs straight into their destinations,
    then their checksums. The padding between storages is not fetched (as for a load of
    some storages of a file, the padding after the header is checked)."""
    lay, remote = reader.layout, reader.src.remote
    assert remote is not None
    bufs, ptrs = _allocate(reader, idx, False, into)
    ranges = []
    head = reader.src.head
    for s, p in zip(idx, ptrs.tolist()):
        off, nb = int(lay.storage_offsets[s]), int(lay.storage_nbytes[s])
        if off + nb <= len(head):  # came with the first GET
            raw_view(p, nb)[:] = head[off : off + nb]
        elif nb:
            ranges.append((off, raw_view(p, nb)))
    remote.read_ranges_into(
        ranges,
        part_nbytes=_config.remote_part_nbytes(),
        concurrency=_config.remote_concurrency(),
        max_gap=native.ALIGN,  # storages are 4096-aligned: runs of small ones share GETs
    )
    if verify:
        _verify(reader, idx, ptrs, threads, None)
    return bufs


def _map_storages(
    reader: Reader, idx: list[int], verify: bool, threads: int, whole: bool
) -> dict[int, Any]:
    lay = reader.layout
    if reader.src.fd is None:
        raise ValueError("tensorfile.load: mmap=True needs a path, not a stream")
    mm = _mmap.mmap(reader.src.fd, 0, access=_mmap.ACCESS_COPY)
    mapped = np.frombuffer(mm, dtype=np.uint8)
    if whole and lay.canonical_gaps:
        cursor = _data_begin(lay)
        for s in range(len(lay.storage_kind)):
            off = int(lay.storage_offsets[s])
            if off > cursor:
                check_padding(reader.name, mapped[cursor:off], cursor)
            cursor = max(cursor, off + int(lay.storage_nbytes[s]))
    if verify and idx:
        base = np.uint64(mapped.ctypes.data)
        _verify(reader, idx, lay.storage_offsets[idx] + base, threads, None)
    out: dict[int, Any] = {}
    torch_storage = None
    if any(lay.storage_kind[s] == "torch" for s in idx) and len(mapped):
        torch_storage = _torch.storage_over(_torch.module(reader.name), mm)
    for s in idx:
        off = int(lay.storage_offsets[s])
        nb = int(lay.storage_nbytes[s])
        if lay.storage_kind[s] == "torch":
            out[s] = _torch.slice_storage(_torch.module(reader.name), torch_storage, off, nb)
        else:
            out[s] = mapped[off : off + nb]
    return out


def _cuda_targets(reader: Reader, idx: list[int], map_location: Any) -> dict[int, Any]:
    """The storages that go straight from the file to CUDA memory."""
    lay = reader.layout
    if not any(lay.storage_kind[s] == "torch" for s in idx):
        return {}
    torch = _torch.module(reader.name)
    return _torch.target_devices(torch, lay.storage_device, lay.storage_kind, idx, map_location)


def _read_to_cuda(
    reader: Reader,
    idx: list[int],
    direct: dict[int, Any],
    map_location: Any,
    verify: bool,
    threads: int,
    whole: bool,
    into: dict[int, Any],
) -> dict[int, Any]:
    """Allocates each target storage on its CUDA device (or takes its destination from
    `into`) and fills it from the file; the rest (numpy arrays, CPU tensors) is read as
    usual."""
    lay = reader.layout
    fd = reader.src.fd
    assert fd is not None
    torch = _torch.module(reader.name)
    _cuda.require_runtime()
    zeros: list[tuple[int, int]] = []
    checksum = verify and lay.crc_kind != "none"
    if whole and lay.canonical_gaps:
        zeros = zero_ranges(
            lay.storage_offsets, lay.storage_nbytes, _data_begin(lay), lay.file_nbytes
        )
        advise_sequential(fd)
    out: dict[int, Any] = {}
    by_device: dict[int, list[int]] = {}
    for s, dev in direct.items():
        index = _cuda.device_index(torch, dev)
        out[s] = torch.UntypedStorage(
            int(lay.storage_nbytes[s]), device=torch.device("cuda", index)
        )
        if lay.storage_nbytes[s]:
            by_device.setdefault(index, []).append(s)
    for index, group in sorted(by_device.items()):
        got = read_regions_to_device(
            fd,
            reader.name,
            [out[s].data_ptr() for s in group],
            lay.storage_nbytes[group],
            lay.storage_offsets[group],
            index,
            checksum=checksum,
            zero_ranges=zeros,
            num_threads=threads,
            gds_path=reader.name,
            zip_crc=lay.crc_kind == "crc32",
        )
        zeros = []
        if checksum:
            check_storage_crcs(reader, group, got)
    if zeros:  # nothing to read, but the padding is still checked
        index = _cuda.device_index(torch, next(iter(direct.values())))
        read_regions_to_device(
            fd, reader.name, [], [], [], index, zero_ranges=zeros, num_threads=threads
        )
    rest = [s for s in idx if s not in direct]
    if rest:  # the padding was checked above
        raw = _pread_storages(reader, rest, verify, threads, False, False, into)
        place = _torch.placer(lay, reader.name, map_location)
        out.update({s: raw[s] if s in into else place(s, raw[s]) for s in rest})
    return out


# --------------------------------------------------------------------------- sources


_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _refuse_unless_regular(name: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(21, f"tensorfile: {name} is a directory, not a file", name)
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a file")
        raise FormatError(f"{name}: not a regular file ({kind})")


def open_regular(name: str, nofollow: bool = False) -> tuple[int, os.stat_result]:
    """Opens a regular file for reading; returns the descriptor and its fstat. Anything
    else raises before it can block or act: a directory IsADirectoryError, a FIFO, device
    or socket FormatError. Block devices are refused too (their st_size is 0 and a
    checkpoint is a file). stat first, so that no device is even opened (opening a tape
    rewinds it), then the open is non-blocking (a FIFO swapped in meanwhile would wait for
    a writer forever) and fstat of what was opened decides."""
    _refuse_unless_regular(name, (os.lstat if nofollow else os.stat)(name).st_mode)
    follow = os.O_NOFOLLOW if nofollow else 0
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | O_CLOEXEC | follow)
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(name, st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class Source:
    """An open file: a descriptor read with pread, or a stream. A seekable stream (an
    open file, BytesIO) is read at positions like a file, from where it stood when
    handed over; a pipe-like stream can only be read once, in order."""

    def __init__(
        self,
        f: FileLike,
        nofollow: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`nofollow`: a path that is a symbolic link is refused. A str with a URL scheme
        is an object (s3://, gs://, az://, http(s)://; file:// is a local path), read by
        ranged GETs; `storage_options` override the store's configuration."""
        self.fd: int | None = None
        self.stream: IO[bytes] | None = None
        self.owns_fd = False
        self.seekable = True
        self.base = 0
        self.nbytes: int | None = None
        self.consumed = 0
        self.remote: _remote.RemoteReader | None = None
        self.head = b""
        target = _remote.resolve(f)
        if isinstance(target, _remote.ObjectURL):
            self.name = target.url
            self.remote = _remote.RemoteReader(target, storage_options)
            # One GET brings the preamble and, for most files, the whole header; the
            # object's size comes with it.
            self.head = self.remote.read(0, _REMOTE_HEAD_NBYTES)
            self.nbytes = self.remote.nbytes
            return
        f = target
        if isinstance(f, (str, os.PathLike)):
            self.name = os.fspath(f)
            self.fd, st = open_regular(self.name, nofollow)
            self.owns_fd = True
            self.nbytes = st.st_size
        elif hasattr(f, "read"):
            self.name = str(getattr(f, "name", "<stream>"))
            self.stream = f
            try:
                self.seekable = bool(f.seekable()) if hasattr(f, "seekable") else False
            except (OSError, ValueError):
                self.seekable = False
            if self.seekable:
                self.base = f.tell()
                self.nbytes = f.seek(0, os.SEEK_END) - self.base
                f.seek(self.base)
        else:
            raise TypeError(
                f"tensorfile: expected a path or a readable binary file object, got {type(f).__name__}"
            )
        self.consumed = 0

    def _position(self, offset: int) -> None:
        assert self.stream is not None
        if self.seekable:
            self.stream.seek(self.base + offset)
        elif offset != self.consumed:
            raise ValueError(
                f"{self.name}: this stream cannot seek; read it whole with tensorfile.load"
            )
        self.consumed = offset

    def read(self, nbytes: int, offset: int) -> bytes:
        if self.remote is not None:
            if offset + nbytes <= len(self.head):
                return self.head[offset : offset + nbytes]
            return self.remote.read(offset, nbytes)
        if self.fd is not None:
            parts = []
            got = 0
            while got < nbytes:
                chunk = os.pread(self.fd, nbytes - got, offset + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        assert self.stream is not None
        self._position(offset)
        out = self.stream.read(nbytes) or b""
        while len(out) < nbytes:
            more = self.stream.read(nbytes - len(out))
            if not more:
                break
            out += more
        self.consumed += len(out)
        return out

    def readinto(self, view: memoryview, offset: int) -> int:
        """Fills `view` from the stream at `offset` without an intermediate copy;
        returns the bytes read (fewer only at end of file)."""
        if self.remote is not None:
            return self.remote.read_into(offset, view)
        assert self.stream is not None
        self._position(offset)
        readinto = getattr(self.stream, "readinto", None)
        got = 0
        while got < len(view):
            if readinto is not None:
                n = readinto(view[got:])
            else:
                chunk = self.stream.read(len(view) - got)
                n = len(chunk)
                view[got : got + n] = chunk
            if not n:
                break
            got += n
        self.consumed += got
        return got

    def close(self) -> None:
        if self.owns_fd and self.fd is not None:
            os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class Held:
    """Bytes a file already holds: storage `storage` of `file`."""

    file: str
    storage: int
    nbytes: int
    crc32c: int


class Reuse:
    """An incremental save (CheckpointManager): storages whose XXH3-128 digest is in
    `index` are not written but referred to (format 1.1). After the save, `digests`
    holds each storage's digest (None for one not hashed: empty or in device memory),
    `refs` the storages referred to, and `crcs` every storage's CRC32C."""

    def __init__(self, index: dict[bytes, Held]) -> None:
        self.index = index
        self.digests: list[bytes | None] = []
        self.refs: dict[int, Held] = {}
        self.nbytes = np.zeros(0, dtype=np.uint64)
        self.crcs = np.zeros(0, dtype=np.uint32)
        self.hashed = np.zeros(0, dtype=np.int64)  # the storages digested ...
        self.hashed_crcs = np.zeros(0, dtype=np.uint32)  # ... and their CRC32C then

    def choose(self, plan: SavePlan, threads: int) -> dict[int, tuple[str, int]]:
        dev = np.array(plan.devices, dtype=object)
        hashed = np.flatnonzero((plan.nbytes > 0) & (dev == "cpu"))
        # The CRC32C comes in the same pass: the write checks its bytes against it.
        digests, crcs = _engine.hash_and_checksum_regions(
            addresses=_u64(plan.ptrs[hashed]), nbytes=_u64(plan.nbytes[hashed]), num_threads=threads
        )
        self.hashed = hashed
        self.hashed_crcs = crcs
        self.digests = [None] * len(plan.nbytes)
        self.nbytes = plan.nbytes.copy()
        for s, d in zip(hashed.tolist(), digests):
            self.digests[s] = d
            held = self.index.get(d)
            if held is not None and held.nbytes == int(plan.nbytes[s]):
                self.refs[s] = held
        return {s: (h.file, h.storage) for s, h in self.refs.items()}


def save(
    obj: Any,
    f: FileLike,
    *,
    durable: bool,
    num_threads: int | None,
    metadata: dict[str, str] | None,
    saved_from: dict[int, str] | None = None,
    reuse: Reuse | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """A save, its arguments checked: plan, encode, write. Call with the collector paused.
    `saved_from` maps id(tensor) to the device to record for its storage, for copies that
    stand in for tensors elsewhere (async_save's snapshots of CUDA tensors). `reuse`
    (a path only) makes it incremental."""
    threads = _config.num_threads(num_threads)
    target = _remote.resolve(f)
    if isinstance(target, _remote.ObjectURL):
        if reuse is not None:
            raise ValueError(f"{target.url}: incremental saves need a local directory")
        plan, header, crc_pos = plan_and_encode(obj, metadata, saved_from)
        total = native.file_nbytes(len(header), plan.offsets, plan.nbytes)
        _write_remote(target, plan, header, crc_pos, total, threads, storage_options)
        return
    f = target
    choose = None
    if reuse is not None:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError("tensorfile: an incremental save needs a path")
        choose = functools.partial(reuse.choose, threads=threads)
    plan, header, crc_pos = plan_and_encode(obj, metadata, saved_from, choose)
    refs = reuse.refs if reuse is not None else {}
    nbytes = plan.nbytes.copy()
    nbytes[list(refs)] = 0  # held elsewhere
    total = native.file_nbytes(len(header), plan.offsets, nbytes)
    if isinstance(f, (str, os.PathLike)):
        crcs = _write_path(os.fspath(f), plan, header, crc_pos, total, threads, durable, reuse)
        if reuse is not None:
            reuse.crcs = crcs
    else:
        _write_stream(f, plan, header, crc_pos, total, threads)


def _write_remote(
    target: _remote.ObjectURL,
    plan: SavePlan,
    header: bytearray,
    crc_pos: int,
    total: int,
    threads: int,
    storage_options: dict[str, Any] | None,
) -> None:
    """A save to an object: one multipart upload of the file's bytes in order, completed
    only when every part is in; a failure aborts it and the old object stays."""
    ptrs, _host = _torch.host_copies(plan.devices, plan.ptrs, plan.nbytes, plan.keepalive)
    crcs = checksum_host(ptrs, plan.nbytes, threads=threads)
    native.set_checksums(header, crc_pos, crcs)
    head = native.make_preamble(header, total) + bytes(header)

    def changed(s: int) -> RuntimeError:
        return RuntimeError(
            f"tensorfile.save: {target.url}: a tensor changed while it was being saved "
            f"(storage {s}; another thread wrote to it); the upload was aborted"
        )

    # A chunk per part, so that parts go up as they are made.
    chunks = _checked_chunks(
        ptrs, plan, crcs, native.data_start(len(header)), len(head),
        _config.remote_part_nbytes(), changed,
    )  # fmt: skip
    _upload(target, itertools.chain([head], chunks), total, storage_options)


def upload_file(
    path: str, target: _remote.ObjectURL, storage_options: dict[str, Any] | None = None
) -> None:
    """Uploads a local file as the object `target`, from a read-only mapping of it."""
    fd, st = open_regular(path)
    try:
        if st.st_size == 0:
            _upload(target, [b""], 0, storage_options)
            return
        with _mmap.mmap(fd, st.st_size, prot=_mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                _upload(target, [view], st.st_size, storage_options)
            finally:
                view.release()
    finally:
        os.close(fd)


def _upload(
    target: _remote.ObjectURL,
    pieces: Any,
    total: int,
    storage_options: dict[str, Any] | None,
) -> None:
    """Uploads the object's bytes; first aborts what earlier savers of this key, killed
    mid-upload, left incomplete (S3, where botocore is installed; best effort)."""
    if target.kind == "s3":
        with contextlib.suppress(Exception):
            _remote.abort_incomplete_uploads(
                target, storage_options=storage_options, exact_key=True
            )
    phase("writing")
    _remote.upload(
        target,
        pieces,
        total=total,
        part_nbytes=_config.remote_part_nbytes(),
        concurrency=_config.remote_concurrency(),
        storage_options=storage_options,
    )


def _write_path(
    path: str,
    plan: SavePlan,
    header: bytearray,
    crc_pos: int,
    total: int,
    threads: int,
    durable: bool,
    reuse: Reuse | None,
) -> np.ndarray:
    base = np.uint64(native.data_start(len(header)))
    refs = reuse.refs if reuse is not None else {}
    keep = np.ones(len(plan.nbytes), dtype=bool)
    keep[list(refs)] = False
    with atomic_file(path, total, durable) as fd:
        crcs = np.zeros(len(plan.nbytes), dtype=np.uint32)
        crcs[keep] = write_storages(
            fd,
            path,
            f"/proc/self/fd/{fd}",
            [d for d, k in zip(plan.devices, keep.tolist()) if k],
            plan.ptrs[keep],
            plan.nbytes[keep],
            plan.offsets[keep] + base,
            threads,
            writeback=durable,
        )
        # An incremental save records the digest taken before the write as the identity of
        # the bytes written: a storage changed by another thread in between would give a
        # later save a wrong match, so the bytes written must have the checksum they had.
        if reuse is not None and not _same_as_digested(reuse, crcs, keep):
            raise RuntimeError(
                f"tensorfile.save: {path}: a tensor changed while it was being saved "
                "(another thread wrote to it); nothing was written"
            )
        for s, held in refs.items():
            crcs[s] = held.crc32c
        native.set_checksums(header, crc_pos, crcs)
        head = native.make_preamble(header, total, 1 if refs else 0) + bytes(header)
        phase("header")
        pwrite_all(fd, head, 0)
    return crcs


def _same_as_digested(reuse: Reuse, written: np.ndarray, keep: np.ndarray) -> bool:
    mask = keep[reuse.hashed]
    return bool(np.array_equal(written[reuse.hashed[mask]], reuse.hashed_crcs[mask]))


def write_storages(
    fd: int,
    path: str,
    gds_path: str,
    devices: Sequence[str],
    ptrs: np.ndarray,
    nbytes: np.ndarray,
    file_offsets: np.ndarray,
    threads: int,
    writeback: bool = False,
) -> np.ndarray:
    """Writes a save plan's storages, host ones with the engine's write_regions and CUDA
    ones through the staging pipeline, device by device; returns every CRC32C. Empty
    storages have no bytes and CRC 0. `gds_path` opens the same file again for cuFile
    (e.g. /proc/self/fd/N). `writeback` (for a save that fsyncs) starts the disk write
    of host bytes as they are written."""
    crcs = np.zeros(len(nbytes), dtype=np.uint32)
    dev = np.array(devices, dtype=object)
    full = nbytes > 0
    host = full & (dev == "cpu")
    if host.any():
        crcs[host] = write_host(
            fd,
            path,
            ptrs[host],
            nbytes[host],
            file_offsets[host],
            threads=threads,
            writeback=writeback,
        )
    for name in sorted(set(devices) - {"cpu"}):
        mask = full & (dev == name)
        if not mask.any():
            continue
        _cuda.require_runtime(f"to save {name} tensors")
        crcs[mask] = write_regions_from_device(
            fd,
            path,
            ptrs[mask],
            nbytes[mask],
            file_offsets[mask],
            _cuda.saved_index(name),
            num_threads=threads,
            gds_path=gds_path,
        )
    return crcs


def _write_stream(
    f: IO[bytes], plan: SavePlan, header: bytearray, crc_pos: int, total: int, threads: int
) -> None:
    if not hasattr(f, "write"):
        raise TypeError(
            f"tensorfile.save: f must be a path or a writable binary file object, got {type(f).__name__}"
        )
    ptrs, _host = _torch.host_copies(plan.devices, plan.ptrs, plan.nbytes, plan.keepalive)
    crcs = checksum_host(ptrs, plan.nbytes, threads=threads)
    native.set_checksums(header, crc_pos, crcs)
    head = native.make_preamble(header, total) + bytes(header)
    f.write(head)

    def changed(s: int) -> RuntimeError:
        return RuntimeError(
            f"tensorfile.save: storage {s} changed while it was being written to the stream; "
            "the stream holds a damaged file. Save from a snapshot (tensorfile.async_save takes "
            "one) or stop other threads from changing the tensors during the save"
        )

    base = native.data_start(len(header))
    for piece in _checked_chunks(ptrs, plan, crcs, base, len(head), _STREAM_CHUNK, changed):
        f.write(piece)


def _checked_chunks(
    ptrs: np.ndarray,
    plan: SavePlan,
    crcs: np.ndarray,
    base: int,
    cursor: int,
    step: int,
    changed: Callable[[int], Exception],
) -> Iterator[bytes]:
    """The data section from `cursor` on, in file order: the zero padding, and each
    storage copied in chunks of `step` bytes. Where the header (with the checksums) must
    go out first, as in a stream or an upload, each chunk is checked against them again
    as it is copied: a storage whose bytes changed since its checksum was taken (another
    thread writing to a tensor during the save) raises `changed(storage)` instead of
    letting a file that does not load be completed."""
    for s, (ptr, nb, off) in enumerate(
        zip(ptrs.tolist(), plan.nbytes.tolist(), plan.offsets.tolist())
    ):
        if nb == 0:
            continue
        at = base + off
        if at > cursor:
            yield bytes(at - cursor)
        crc = 0
        for k in range(0, nb, step):
            chunk = bytes(raw_view(ptr + k, min(step, nb - k)))
            crc = _engine.crc32c(chunk, crc)
            yield chunk
        if crc != int(crcs[s]):
            raise changed(s)
        cursor = at + nb


def write_file(
    path: str,
    total: int,
    head: bytes,
    regions: Any,
    *,
    durable: bool,
    threads: int,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Writes `head` at offset 0 and host regions (ptrs, nbytes, file_offsets; sorted,
    disjoint, non-empty) to `path` (or an object-store URL), atomically; for formats
    without checksums."""
    ptrs, nbytes, offsets = regions
    target = _remote.resolve(path)
    if isinstance(target, _remote.ObjectURL):
        pieces: list[Any] = [head]
        cursor = len(head)
        for ptr, nb, off in zip(
            np.asarray(ptrs).tolist(), np.asarray(nbytes).tolist(), np.asarray(offsets).tolist()
        ):
            if off > cursor:
                pieces.append(bytes(off - cursor))
            pieces.append(raw_view(ptr, nb))
            cursor = off + nb
        _upload(target, pieces, total, storage_options)
        return
    path = target
    with atomic_file(path, total, durable) as fd:
        if len(ptrs):
            write_host(
                fd, path, ptrs, nbytes, offsets, threads=threads, checksum=False, writeback=durable
            )
        pwrite_all(fd, head, 0)
