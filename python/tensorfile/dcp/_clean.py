"""Which rank files of a checkpoint directory are dead, and removing them: writers hold a
lock on a marker file per rank file until their save commits, so a save that died (and
only one that died) leaves rank files that no commit record lists and no process holds.
Imports no torch, so `tensorfile clean` stays fast."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import threading

from .._errors import FormatError
from ._common import (
    DATA_NAME,
    MAX_JSON_DEPTH,
    MAX_METADATA_NBYTES,
    METADATA_NAME,
    RANK_RECORD_NAME,
    check_json_depth,
    open_inside,
)

try:
    import fcntl
except ImportError:  # no advisory locks here: nothing is ever judged dead
    fcntl = None  # type: ignore[assignment]

# `.<rank file>.lock`, held (flock, exclusive) by the rank that writes the rank file, from
# before the file exists until the save commits or the process ends; created under a
# temporary name and renamed into place already locked.
MARKER = re.compile(r"^\.(__\d+_[0-9a-f]{16}\.tf)\.lock(?:\.[0-9a-f]{8}\.new)?$")

_held: dict[str, tuple[str, str, int]] = {}  # marker path -> (directory, save id, descriptor)
_held_lock = threading.Lock()


def marker_name(rank_file: str) -> str:
    return f".{rank_file}.lock"


def hold(directory: str, rank_file: str) -> None:
    """Marks rank file `rank_file` of `directory` as being written by this process: the
    marker stays locked until release() or the process ends. Markers this process holds
    for earlier saves into the same directory are released first (one save at a time
    runs in a directory; a save that failed is over)."""
    if fcntl is None:
        return
    save_id = DATA_NAME.match(rank_file).group(2)  # type: ignore[union-attr]
    with _held_lock:
        for path, (d, held_id, fd) in list(_held.items()):
            # A marker the commit removed (no link left) guards nothing any more.
            if (d == directory and held_id != save_id) or os.fstat(fd).st_nlink == 0:
                os.close(fd)
                del _held[path]
        final = os.path.join(directory, marker_name(rank_file))
        if final in _held:
            return
        tmp = f"{final}.{secrets.token_hex(4)}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                # No locks on this file system: the marker stays, unlocked, and clean
                # cannot tell whether its save lives, so it never removes its files.
                pass
            os.replace(tmp, final)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _held[final] = (directory, save_id, fd)


def release(directory: str, rank_files: list[str] | set[str], remove: bool) -> None:
    """Drops this process's markers of `rank_files` (and, with `remove`, the marker files
    themselves, whoever holds them: the save they guard has committed)."""
    with _held_lock:
        for name in rank_files:
            path = os.path.join(directory, marker_name(name))
            if remove:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            held = _held.pop(path, None)
            if held is not None:
                os.close(held[2])


def _locked(path: str) -> bool | None:
    """Whether a live process holds marker `path`: True, False, or None when this file
    system cannot say (then nothing it guards is ever removed)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)
    return False


def referenced(directory: str) -> set[str]:
    """The rank files named by the commit records in `directory` (the global one and the
    per-rank ones). A record that cannot be read raises FormatError: then nobody can tell
    which files are committed, and nothing may be removed."""
    out: set[str] = set()
    for name in os.listdir(directory):
        if name != METADATA_NAME and not RANK_RECORD_NAME.match(name):
            continue
        where = os.path.join(directory, name)
        fd = open_inside(directory, name, where)
        try:
            if os.fstat(fd).st_size > MAX_METADATA_NBYTES:
                raise FormatError(f"{where}: over the {MAX_METADATA_NBYTES}-byte limit")
            with os.fdopen(os.dup(fd), "rb") as f:
                blob = f.read()
        finally:
            os.close(fd)
        check_json_depth(blob, MAX_JSON_DEPTH, where)
        try:
            files = json.loads(blob)["files"]
            out.update(r[0] for r in files if type(r[0]) is str)
        except (ValueError, KeyError, TypeError, IndexError):
            raise FormatError(
                f"{where}: cannot be read, so which rank files are committed is unknown"
            ) from None
    return out


def dead_rank_files(directory: str, keep: set[str], rank: int | None = None) -> list[str]:
    """Rank files of `directory` that are not in `keep` (the committed ones) and belong to
    no live save: no marker of their save is held by a live process. With `rank`, only
    that rank's files are considered."""
    names = os.listdir(directory)
    markers: dict[str, list[str]] = {}  # save id -> marker names
    for name in names:
        m = MARKER.match(name)
        if m:
            markers.setdefault(DATA_NAME.match(m.group(1)).group(2), []).append(name)  # type: ignore[union-attr]
    live: dict[str, bool | None] = {}

    def save_is_live(save_id: str) -> bool | None:
        if save_id not in live:
            states = [_locked(os.path.join(directory, n)) for n in markers.get(save_id, [])]
            live[save_id] = True if True in states else None if None in states else False
        return live[save_id]

    out = []
    for name in names:
        m = DATA_NAME.match(name)
        if m is None or name in keep or (rank is not None and int(m.group(1)) != rank):
            continue
        if save_is_live(m.group(2)) is False:
            out.append(name)
    return out


def remove_dead(directory: str, keep: set[str], rank: int | None = None) -> list[str]:
    """Removes dead_rank_files(directory, keep, rank), then the markers no live process
    holds whose rank file is gone or kept; returns the paths removed."""
    removed = []
    for name in dead_rank_files(directory, keep, rank):
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    for name in os.listdir(directory):
        m = MARKER.match(name)
        if m is None or (rank is not None and not m.group(1).startswith(f"__{rank}_")):
            continue
        if m.group(1) in keep or not os.path.exists(os.path.join(directory, m.group(1))):
            path = os.path.join(directory, name)
            if _locked(path) is False:
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def clean(directory: str | os.PathLike[str]) -> list[str]:
    """Removes the rank files that saves into checkpoint directory `directory` left when
    they died before committing, and their markers; returns the paths removed. A rank
    file is removed only when no commit record in the directory names it and no process
    holds a marker of its save, so a save that is still running (here, or on another host
    of a file system that shares locks between hosts) keeps its files, and a committed
    checkpoint is never touched. Temporary files of dead writers are tensorfile.clean's."""
    d = os.fspath(directory)
    return remove_dead(d, referenced(d))
