"""Tuning knobs: TENSORFILE_* environment variables, overridable per call."""

from __future__ import annotations

import os

# Measured on 2-core VMs with ext4: buffered writes from two threads
# ran at about 4 GB/s with 1 MiB tasks but dropped to 0.6-1.5 GB/s in some runs with 4-8
# MiB tasks; reads were best or level at 8 MiB (hot) and need large requests cold.
_DEFAULT_WRITE_TASK_NBYTES = 1 << 20
_DEFAULT_READ_TASK_NBYTES = 8 << 20


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def num_threads(requested: int | None = None) -> int:
    """Threads for one transfer: the argument, else TENSORFILE_NUM_THREADS, else the
    number of cores this process may use (at most 16)."""
    if requested is not None:
        if type(requested) is not int or requested < 1:
            raise ValueError(f"num_threads must be a positive int, got {requested!r}")
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return _env_int("TENSORFILE_NUM_THREADS", min(cores, 16))


def task_nbytes(write: bool = False) -> int:
    """Bytes per I/O task: TENSORFILE_TASK_NBYTES, else 1 MiB for writes and 8 MiB for reads."""
    return _env_int(
        "TENSORFILE_TASK_NBYTES", _DEFAULT_WRITE_TASK_NBYTES if write else _DEFAULT_READ_TASK_NBYTES
    )


def hugepages() -> bool:
    """TENSORFILE_HUGEPAGES=1 asks for transparent huge pages on load destinations.

    Off by default: on the VMs we measured, the first huge-page faults of a process are
    backed by the hypervisor page by page and ran at 0.4 GB/s, against 2.5 GB/s for
    ordinary pages (later loads in the same process reached 4-5 GB/s with huge pages)."""
    return os.environ.get("TENSORFILE_HUGEPAGES", "0") not in ("", "0")


def staging_buffers() -> int:
    """Pinned staging buffers per worker for CUDA transfers: TENSORFILE_STAGING_BUFFERS, else 4."""
    return _env_int("TENSORFILE_STAGING_BUFFERS", 4)


def staging_nbytes() -> int:
    """Bytes per pinned staging buffer (one read or write of a CUDA transfer):
    TENSORFILE_STAGING_NBYTES, else 16 MiB; values under 4096 act as 4096."""
    return max(4096, _env_int("TENSORFILE_STAGING_NBYTES", 16 << 20))


def gds() -> str:
    """TENSORFILE_GDS: "auto" (the default) uses GPUDirect Storage when cuFile and the file
    system allow it and falls back to staging quietly; "on" raises when it cannot be
    used; "off" never tries."""
    raw = os.environ.get("TENSORFILE_GDS", "auto").strip().lower() or "auto"
    if raw not in ("auto", "on", "off"):
        raise ValueError(f"TENSORFILE_GDS={raw!r} must be auto, on or off")
    return raw


def remote_part_nbytes() -> int:
    """Bytes per ranged GET and per multipart part on object stores:
    TENSORFILE_REMOTE_PART_NBYTES, else 16 MiB (S3 needs at least 5 MiB per part)."""
    return _env_int("TENSORFILE_REMOTE_PART_NBYTES", 16 << 20)


def remote_concurrency() -> int:
    """Requests in flight per object-store transfer: TENSORFILE_REMOTE_CONCURRENCY, else 16."""
    return _env_int("TENSORFILE_REMOTE_CONCURRENCY", 16)
