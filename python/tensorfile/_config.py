"""Tuning knobs: TENSORFILE_* environment variables, overridable per call."""

from __future__ import annotations

import os

_DEFAULT_TASK_NBYTES = 8 << 20


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


def task_nbytes() -> int:
    """Bytes per I/O task: TENSORFILE_TASK_NBYTES, default 8 MiB."""
    return _env_int("TENSORFILE_TASK_NBYTES", _DEFAULT_TASK_NBYTES)
