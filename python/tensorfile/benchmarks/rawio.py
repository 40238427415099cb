"""The plain system calls the benchmarks measure against and prepare their files with: the pread and pwrite loops of the raw limits, page-cache warming and eviction, fsync, and the mount a directory is on."""

from __future__ import annotations

import ctypes
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CHUNK = 64 << 20  # one large write or read per call, as a tuned copy loop would do
_THREAD_CHUNK = 8 << 20


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... and the core count itself: the threads the limits and the thread sweep use."""
    out = {cores}
    n = 1
    while n < cores:
        out.add(n)
        n *= 2
    return sorted(out)


# --------------------------------------------------------------------------- files


def fsync_file(path: str) -> None:
    """Flushes the file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_of(path: str) -> list[str]:
    """The file, or every file under the directory (torch.distributed.checkpoint writes one)."""
    if not os.path.isdir(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def evict(path: str) -> None:
    """Drops the pages of a file, or of every file under a directory, from the page
    cache, for a cold read; fsync first because dirty pages stay."""
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_durable(path: str) -> None:
    """What tensorfile's durable=True promises, for the peers: the file's bytes and its
    directory entry on disk."""
    from .._files import fsync_dir

    fsync_file(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove(path: str) -> None:
    """Removes the file or directory, if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


# --------------------------------------------------------------------------- page cache


def warm(path: str) -> None:
    """Reads the whole file (or directory) once so that its pages are in the page cache."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if n <= 0:
                    break
                off += n
        finally:
            os.close(fd)


def resident_fraction(path: str) -> float | None:
    """The fraction of the files' pages in the page cache (mincore), to show that an
    eviction took; None where it cannot be asked."""
    pages = resident = 0
    for p in files_of(path):
        got = _resident(p)
        if got is None:
            return None
        pages += got[1]
        resident += got[0]
    return resident / pages if pages else 0.0


def _resident(path: str) -> tuple[int, int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = os.path.getsize(path)
        if size == 0:
            return (0, 0)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + PAGE - 1) // PAGE
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return (sum(b & 1 for b in bytes(vec)), pages)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- the raw limits


def read_file(path: str, dst: Any, threads: int) -> None:
    """preads the file into `dst` (a touched uint8 array as large as the file)."""
    view = memoryview(dst).cast("B")
    size = len(view)
    fd = os.open(path, os.O_RDONLY)
    try:

        def span(off: int, end: int) -> None:
            while off < end:
                n = os.preadv(fd, [view[off:end]], off)
                if n <= 0:
                    raise OSError(f"{path}: short read at {off}")
                off += n

        if threads <= 1:
            for off in range(0, size, CHUNK):
                span(off, min(size, off + CHUNK))
        else:
            with ThreadPoolExecutor(threads) as pool:
                jobs = [
                    pool.submit(span, o, min(size, o + _THREAD_CHUNK))
                    for o in range(0, size, _THREAD_CHUNK)
                ]
                for j in jobs:
                    j.result()
    finally:
        os.close(fd)


_WRITEBACK_CHUNK = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), which os does not expose; None elsewhere."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def write_file(path: str, size: int, threads: int, src: bytes, writeback: bool = False) -> None:
    """Writes `size` bytes with `threads` threads, each pwriting one contiguous share in
    large calls, into space reserved first, then fsyncs: a tuned writer's raw system calls.
    `writeback` writes 8 MiB at a time and starts the disk write of each piece at once
    (sync_file_range), so that the disk works while later pieces are copied."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Reserve the space first, as tensorfile does: on ext4 writes into reserved
        # extents ran up to 2.7x faster here, and the limit must be the best a writer can do.
        if size:
            os.posix_fallocate(fd, 0, size)
        view = memoryview(src)
        start = _sync_file_range() if writeback else None
        piece = min(len(view), _WRITEBACK_CHUNK) if start else len(view)

        def span(off: int, end: int) -> None:
            while off < end:
                n = os.pwrite(fd, view[: min(end - off, piece)], off)
                if start is not None:
                    start(fd, off, n, _SYNC_FILE_RANGE_WRITE)
                off += n

        share = -(-size // threads) if size else 0
        share = -(-share // PAGE) * PAGE
        bounds = [(o, min(size, o + share)) for o in range(0, size, share or 1)]
        if len(bounds) <= 1:
            for a, b in bounds:
                span(a, b)
        else:
            with ThreadPoolExecutor(len(bounds)) as pool:
                for j in [pool.submit(span, a, b) for a, b in bounds]:
                    j.result()
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the machine


def filesystem(path: str) -> dict[str, Any]:
    """The mount holding `path`: device, type and free space."""
    real = os.path.realpath(path)
    best = ("?", "?", "/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[2]
                ):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    st = os.statvfs(real)
    return {
        "device": best[0],
        "type": best[1],
        "mount": best[2],
        "free_gib": st.f_bavail * st.f_frsize / (1 << 30),
    }
