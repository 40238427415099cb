"""Commits on the local file system: temporary names, atomic replace, directory fsync,
and cleaning up after dead writers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Iterator
from typing import IO, Union

from . import _engine

PathLike = Union[str, "os.PathLike[str]"]
FileLike = Union[PathLike, IO[bytes]]

TMP_MARK = ".tftmp"
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# Test hook for the crash tests: with TENSORFILE_TEST_PHASE_FD set, a save writes the name
# of each step it reaches to that descriptor, so a parent can kill it at a known moment.
_PHASE_FD = (
    int(os.environ["TENSORFILE_TEST_PHASE_FD"])
    if os.environ.get("TENSORFILE_TEST_PHASE_FD")
    else None
)


def phase(name: str) -> None:
    if _PHASE_FD is not None:
        os.write(_PHASE_FD, name.encode() + b"\n")


def _host() -> str:
    return socket.gethostname().replace(".", "_")[:32]


def tmp_name(target: str) -> str:
    directory, base = os.path.split(target)
    return os.path.join(
        directory, f".{base}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{TMP_MARK}"
    )


# The names tmp_name makes: .NAME.HOST.PID.RANDOM.tftmp, RANDOM being 8 hex digits. Nothing
# else in a directory is ever removed by clean.
_TMP_NAME = re.compile(
    r"\.(?P<base>.+)\.(?P<host>[^.]*)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}" + re.escape(TMP_MARK) + r"\Z",
    re.DOTALL,
)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs in this pid namespace. A guard only, for
    writers that hold no lock (tensorfile before locks): a pid means nothing across pid
    namespaces, so a dead writer whose pid names a live process here is merely kept."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # no process can have a pid that large
    except OSError:
        return True  # EPERM: it exists, owned by someone else
    return True


def _lock(fd: int) -> bool:
    """Takes the writer's lock on a temporary file without waiting: False if another open
    file holds it. flock locks belong to the open file description, so they hold across pid
    namespaces on one kernel and between two saves in one process (POSIX record locks do
    neither), and they go when the writer's last descriptor closes or it dies. Linux NFS
    clients send them to the server as whole-file locks, unless mounted with nolock or
    local_lock; temporary files of other hosts are therefore never removed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_dead(path: str) -> bool:
    """Removes the temporary file at `path` if it is a regular file whose writer's lock
    can be taken; True if it did. The lock is held through the unlink, and the name must
    still lead to the file locked, so a file renamed or replaced meanwhile is left."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO put there in the meantime is refused
    # at once. The lock needs a writable descriptor on NFS; a read-only one does elsewhere.
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | flags)
    except (FileNotFoundError, IsADirectoryError):
        return False
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or not _lock(fd):
            return False
        try:
            if not _same_inode(os.lstat(path), held):
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)  # releases the lock


def clean(
    directory: PathLike, *, on_error: Callable[[str, OSError], None] | None = None
) -> list[str]:
    """Removes temporary files left in `directory` by saves whose writer is gone; returns
    the paths removed. Only regular files named as tensorfile names its temporary files
    (.NAME.HOST.PID.RANDOM.tftmp) with this host's name are candidates, and one is removed
    only when its writer's lock can be taken (a live writer, in any pid namespace, holds
    it) and no process here has its pid. A file that cannot be judged or removed is left
    and passed with its OSError to `on_error` (skipped silently without one). Listing the
    directory itself may raise OSError."""
    removed = []
    host = _host()
    with os.scandir(directory) as it:
        for entry in it:
            m = _TMP_NAME.match(entry.name)
            if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
                continue
            try:
                if _remove_if_dead(entry.path):
                    removed.append(entry.path)
            except OSError as e:
                if on_error is not None:
                    on_error(entry.path, e)
    return removed


def _clean_quietly(directory: str) -> None:
    # Cleaning is a courtesy: a stranger's file or an odd directory never fails a save.
    try:
        clean(directory)
    except Exception:
        pass


def _create_locked(target: str, mode: int) -> tuple[str, int, int]:
    """Creates a temporary file beside `target` and takes the writer's lock on it; returns
    its name, a descriptor to write and a duplicate of it. Closing the first before the
    rename reports late write errors (NFS flushes at each close) while the duplicate keeps
    the open file, and with it the lock, until the name is gone."""
    for _attempt in range(8):
        tmp = tmp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, mode)
        try:
            try:
                locked = _lock(fd)
            except OSError:
                locked = True  # no locks on this file system: the name's host and pid guard it
            # A cleaner may have locked and removed the file in the instant before our lock.
            if locked and _same_inode(os.stat(tmp), os.fstat(fd)):
                return tmp, fd, os.dup(fd)
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(
        errno.EAGAIN, f"tensorfile.save: could not create a temporary file beside {target}"
    )


def _keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    """Gives the file at `fd` the owner, group and permission bits of the file it will
    replace, as far as this process may: a non-root process keeps its own uid and may still
    set a group it belongs to. chown clears set-id bits, so the mode comes after it."""
    now = os.fstat(fd)
    if (now.st_uid, now.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:
            try:
                os.fchown(fd, -1, old.st_gid)
            except OSError:
                pass
    try:
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
    except PermissionError:
        pass  # a file system without modes (vfat, some FUSE); the file stays 0600


@contextlib.contextmanager
def atomic_file(path: str, total: int, durable: bool) -> Iterator[int]:
    """Yields the descriptor of a temporary file beside `path`, with `total` bytes
    reserved, for the caller to fill; then fsyncs it (when durable), renames it over
    `path` and fsyncs the directory. A replaced file's permission bits, owner and group
    carry over to the new one (owner and group as far as the process may set them, before
    any byte is written); a new file gets the mode open() would give it. On any error the
    temporary file is removed and `path` is left as it was; OSErrors say so."""
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    directory = os.path.dirname(target)
    try:
        old: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(21, f"tensorfile.save: {path} is a directory", path)
    _clean_quietly(directory)
    try:
        # Over an existing file, start private and take its mode once the owner is set.
        tmp, fd, lock_fd = _create_locked(target, 0o600 if old is not None else 0o666)
    except FileNotFoundError:
        raise FileNotFoundError(
            2, f"tensorfile.save: directory {directory} does not exist", path
        ) from None
    try:
        try:
            if old is not None:
                _keep_owner_and_mode(fd, old)
            phase("created")
            _engine.preallocate(fd, total, path)
            phase("writing")
            yield fd
            if durable:
                phase("fsync")
                os.fsync(fd)
        finally:
            os.close(fd)
        phase("rename")
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        os.close(lock_fd)
        if isinstance(e, OSError) and e.errno is not None:
            state = "the previous file is intact" if old is not None else "no file was created"
            raise OSError(
                e.errno, f"{os.strerror(e.errno)} while writing {path}; {state}", path
            ) from e
        raise
    os.close(lock_fd)
    if durable:
        phase("fsync-dir")
        fsync_dir(directory)
    phase("done")


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` both exist and are one file (after symlinks, or hard links
    of one inode): writing one would replace the other."""
    try:
        return _same_inode(os.stat(a), os.stat(b))
    except (OSError, ValueError):
        return False


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (rename(2), fsync(2)).
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(dfd)
