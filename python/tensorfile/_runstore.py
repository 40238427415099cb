"""Where a managed run's files live: the few storage operations CheckpointManager needs
(list names, read/write/delete a small object, write/read/remove data, locking, clean-up),
for a local directory and for an object-store prefix. The manager's logic (commits,
retention, load fallback) is the same for both; see docs/manager.md."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import os
import secrets
import shutil
import socket
import stat
import weakref
from collections.abc import Mapping
from typing import Any

from . import _files, _io
from ._errors import FormatError
from ._runs import LOCK_NAME, MAX_RECORD_NBYTES, O_CLOEXEC, Record


def _remove_path(path: str) -> None:
    """Removes a data file or a checkpoint directory (never what a symlink points to)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _in_use(where: str, holder: str, how: str) -> BlockingIOError:
    return BlockingIOError(
        errno.EWOULDBLOCK,
        f"tensorfile.CheckpointManager: {where} is in use by another manager "
        f"({holder}, holding {LOCK_NAME}); close that manager or let its process "
        f"end first{how}, or open this one with read_only=True to read checkpoints only",
    )


class _Lock:
    """The manager's exclusive flock on DIR/.tensorfile-manager.lock, held until release().
    flock locks belong to the open file and go when the process dies, however it dies."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _in_use(directory, holder, "") from None
        except OSError:
            pass  # a file system without locks: nothing can be enforced there
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._finalizer()


class LocalStore:
    """A run in a local directory: names are file names in it."""

    storage_options = None

    def __init__(self, directory: str) -> None:
        self.location = directory

    def target(self, name: str) -> str:
        return os.path.join(self.location, name)

    def listing(self) -> dict[str, int | None]:
        """The names in the directory (no sizes: data_problem stats what it needs)."""
        return dict.fromkeys(os.listdir(self.location))

    def read_record(self, name: str, listing: dict[str, int | None]) -> bytes:
        where = self.target(name)
        try:
            fd, st = _io.open_regular(where)
        except IsADirectoryError:
            raise FormatError(f"{where}: a directory, not a commit record") from None
        try:
            if st.st_size > MAX_RECORD_NBYTES:
                raise FormatError(
                    f"{where}: {st.st_size} bytes, over the {MAX_RECORD_NBYTES}-byte limit"
                )
            return os.pread(fd, st.st_size + 1, 0)
        finally:
            os.close(fd)

    def write_record(self, name: str, blob: bytes, durable: bool) -> None:
        with _files.atomic_file(self.target(name), len(blob), durable) as fd:
            _files.pwrite_all(fd, blob, 0)

    def remove_record(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.target(name))

    def records_removed(self, durable: bool) -> None:
        """Makes the removal of records durable before any data goes."""
        if durable:
            _files.fsync_dir(self.location)

    def remove_data(self, name: str) -> None:
        _remove_path(self.target(name))

    def data_nbytes(self, name: str) -> int:
        return os.lstat(self.target(name)).st_size

    def data_problem(self, rec: Record, listing: dict[str, int | None]) -> str | None:
        """Why the data of a committed record is not whole, or None. Cheap: stat only."""
        path = self.target(rec.data)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"its data {rec.data} is missing"
        if rec.kind == "tensorfile":
            if not stat.S_ISREG(st.st_mode):
                return f"its data {rec.data} is not a regular file"
            if st.st_size != rec.nbytes:
                return f"its data {rec.data} holds {st.st_size} bytes, the commit recorded {rec.nbytes}"
            for held in sorted(rec.uses() - {rec.data}):
                if not os.path.isfile(self.target(held)):
                    return f"{held}, which holds some of its storages, is missing"
            return None
        from .dcp import METADATA_NAME

        if not stat.S_ISDIR(st.st_mode) or not os.path.isfile(os.path.join(path, METADATA_NAME)):
            return f"its data {rec.data} is not a committed DCP directory"
        return None

    def lock(self) -> _Lock:
        return _Lock(self.location)

    def clean(self) -> None:
        """Removes temporary files of dead writers."""
        with contextlib.suppress(OSError):
            _files.clean(self.location)


# --------------------------------------------------------------------------- object store


class _ObjectLock:
    """PREFIX/.tensorfile-manager.lock written with a conditional PUT (If-None-Match: *):
    the store lets only one writer create it. It names its holder; release() deletes it if
    it is still this one's. A killed writer's lock stays until someone deletes it."""

    def __init__(self, store: ObjectStore) -> None:
        from . import _remote

        self.url = store.url.child(LOCK_NAME)
        self._options = store.storage_options
        self.text = (
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
            f"token {secrets.token_hex(8)}\n"
        )
        obs = _remote._obstore()
        s3 = _remote.store_for(self.url, self._options)
        try:
            obs.put(s3, self.url.key, self.text.encode(), mode="create", use_multipart=False)
        except Exception as e:
            if type(e).__name__ != "AlreadyExistsError":
                raise _remote._map_error(e, self.url.url) from e
            try:
                holder = _remote.get_bytes(self.url, storage_options=self._options)
            except OSError:
                holder = b"unknown"
            raise _in_use(
                store.location,
                holder.decode(errors="replace").strip()[:200] or "unknown",
                f" (a writer that was killed leaves the lock: delete {self.url.url} once "
                "it is gone)",
            ) from None
        self._finalizer = weakref.finalize(
            self, _release_object_lock, self.url, self._options, self.text
        )

    def release(self) -> None:
        self._finalizer()


def _release_object_lock(url: Any, options: Any, text: str) -> None:
    from . import _remote

    with contextlib.suppress(OSError):
        if _remote.get_bytes(url, storage_options=options).decode(errors="replace") == text:
            _remote.delete(url, storage_options=options)


class ObjectStore:
    """A run under an object-store prefix: names are the keys directly under it."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        from . import _remote

        self.location = url.rstrip("/")
        self.url = _remote.parse_url(self.location)
        if not self.url.key:
            raise ValueError(
                f"tensorfile.CheckpointManager: {url}: give a prefix under the bucket "
                "(s3://bucket/run), not the bucket itself"
            )
        if self.url.kind == "http":
            raise ValueError(f"tensorfile.CheckpointManager: {url}: http(s) URLs are read-only")
        self.storage_options = dict(storage_options) if storage_options else None

    def target(self, name: str) -> str:
        return self.url.child(name).url

    def _child(self, name: str) -> Any:
        return self.url.child(name)

    def listing(self) -> dict[str, int | None]:
        """{name: byte count} of the objects directly under the prefix (one LIST)."""
        from . import _remote

        prefix = self.url.key.rstrip("/") + "/"
        out: dict[str, int | None] = {}
        for o in _remote.list_objects(
            self.url, recursive=False, storage_options=self.storage_options
        ):
            if o.key.startswith(prefix):
                out[o.key[len(prefix) :]] = o.nbytes
        return out

    def read_record(self, name: str, listing: dict[str, int | None]) -> bytes:
        from . import _remote

        listed = listing.get(name) or 0
        if listed > MAX_RECORD_NBYTES:  # refused before it is downloaded
            raise FormatError(
                f"{self.target(name)}: {listed} bytes, over the {MAX_RECORD_NBYTES}-byte limit"
            )
        blob = _remote.get_bytes(self._child(name), storage_options=self.storage_options)
        if len(blob) > MAX_RECORD_NBYTES:
            raise FormatError(
                f"{self.target(name)}: {len(blob)} bytes, over the {MAX_RECORD_NBYTES}-byte limit"
            )
        return blob

    def write_record(self, name: str, blob: bytes, durable: bool) -> None:
        from . import _remote

        _remote.put_bytes(self._child(name), blob, storage_options=self.storage_options)

    def remove_record(self, name: str) -> None:
        self.remove_data(name)

    def records_removed(self, durable: bool) -> None:
        pass  # a DELETE is durable once it returns

    def remove_data(self, name: str) -> None:
        from . import _remote

        _remote.delete(self._child(name), storage_options=self.storage_options)

    def data_nbytes(self, name: str) -> int:
        from . import _remote

        return _remote.RemoteReader(self._child(name), self.storage_options).nbytes

    def data_problem(self, rec: Record, sizes: dict[str, int | None]) -> str | None:
        """Why the data of a committed record is not whole, or None: from the listing."""
        nbytes = sizes.get(rec.data)
        if nbytes is None:
            return f"its data {rec.data} is missing"
        if nbytes != rec.nbytes:
            return f"its data {rec.data} holds {nbytes} bytes, the commit recorded {rec.nbytes}"
        for held in sorted(rec.uses() - {rec.data}):
            if held not in sizes:
                return f"{held}, which holds some of its storages, is missing"
        return None

    def lock(self) -> _ObjectLock:
        return _ObjectLock(self)

    def clean(self) -> None:
        """Aborts the incomplete multipart uploads under the prefix that were started
        before this process (saves killed mid-upload)."""
        from . import _remote

        if self.url.kind != "s3":
            return
        try:
            _remote.abort_incomplete_uploads(
                self.url.child(""), storage_options=self.storage_options
            )
        except ImportError as e:
            import warnings

            warnings.warn(
                f"tensorfile.CheckpointManager: {e}; incomplete multipart uploads under "
                f"{self.location} of killed saves are left (their parts stay billed)",
                RuntimeWarning,
                stacklevel=4,
            )
