"""async_save: snapshot the tensors into pooled host memory, return a future, write in the background."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
from typing import Any

from . import _remote
from ._torch import describe
from ._tree import Builder, Flattener, path_str
from .formats import FLAG_PARAMETER, FLAG_REQUIRES_GRAD

_ALIGN = 64  # each storage's copy starts here, a multiple of every element size
_ROUND = 2 << 20  # pool buffers are sized in 2 MiB steps, so near sizes reuse one buffer
_MAX_FREE = 2  # idle buffers the pool keeps; more are released to the allocator


class SaveFuture(concurrent.futures.Future[None]):
    """The future of one async_save: `result()` returns None once the file is written
    (durably, with the save's defaults) or raises the save's error. `path` is the target."""

    path: str


class _Pool:
    """Reusable host buffers for snapshots. Thread-safe. A buffer is lent for one save
    and comes back when that save ends; at most _MAX_FREE idle buffers are kept, the
    smallest released first, so memory stays bounded by the saves in flight plus two."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Any] = []  # torch uint8 tensors
        self.allocations = 0  # buffers created so far (for tests and diagnostics)

    def acquire(self, torch: Any, nbytes: int, pinned: bool) -> Any:
        with self._lock:
            fits = [b for b in self._free if b.numel() >= nbytes and b.is_pinned() == pinned]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._free = [b for b in self._free if b is not buf]
                return buf
        size = -(-nbytes // _ROUND) * _ROUND
        self.allocations += 1
        return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)

    def release(self, buf: Any) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel(), reverse=True)
            del self._free[_MAX_FREE:]

    def clear(self) -> None:
        with self._lock:
            self._free = []

    def idle_nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)


_pool = _Pool()
_lock = threading.Lock()
_last: dict[str, SaveFuture] = {}  # the latest save to each target


def async_save(obj: Any, f: Any, **save_kwargs: Any) -> SaveFuture:
    """Saves `obj` to the path `f` in a background thread; returns a future at once.

    Before returning, every tensor's bytes are copied into a buffer from a reusable pool
    (page-locked host memory when some tensor is on CUDA, copied asynchronously and then
    synchronized), so the caller may modify or free its tensors right away. numpy arrays
    are copied plainly. The file is written as `tensorfile.save(obj, f, **save_kwargs)`
    would: atomically, checksummed, durable by default. Objects that cannot be saved
    raise TypeError here, naming the key path; I/O errors come from `result()`.
    A save to a path that another async_save is still writing starts after that one
    ends, so the last call wins. Thread-safe.
    """

    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(
            f"tensorfile.async_save: f must be a path, got {type(f).__name__} "
            "(a stream may be written to by the caller while the save runs)"
        )
    durable = save_kwargs.pop("durable", True)
    num_threads = save_kwargs.pop("num_threads", None)
    metadata = save_kwargs.pop("metadata", None)
    storage_options = save_kwargs.pop("storage_options", None)
    if save_kwargs:
        raise TypeError(f"tensorfile.async_save: unexpected argument {next(iter(save_kwargs))!r}")
    return save_in_background(
        obj,
        f,
        durable=durable,
        num_threads=num_threads,
        metadata=metadata,
        storage_options=storage_options,
    )


def save_in_background(
    obj: Any,
    f: str | os.PathLike[str],
    *,
    durable: bool,
    num_threads: int | None,
    metadata: dict[str, str] | None,
    reuse: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> SaveFuture:
    """async_save with its arguments parsed; `reuse` (an _io.Reuse) makes it incremental."""
    from . import _io
    from ._tree import no_gc

    target: str = str(f) if _remote.has_url_scheme(f) else os.path.abspath(os.fspath(f))
    snapshot, buf, saved_from = _snapshot(obj)
    fut = SaveFuture()
    fut.path = target
    fut.set_running_or_notify_cancel()
    with _lock:
        before = _last.get(target)
        _last[target] = fut

    def work() -> None:
        error: BaseException | None = None
        try:
            if before is not None:
                concurrent.futures.wait([before])
            with no_gc():
                _io.save(
                    snapshot,
                    target,
                    durable=durable,
                    num_threads=num_threads,
                    metadata=metadata,
                    saved_from=saved_from,
                    reuse=reuse,
                    storage_options=storage_options,
                )
        except BaseException as e:
            error = e
        # The buffer goes back before the future completes, so a caller that waits for
        # this save and starts the next one gets the same buffer.
        if buf is not None:
            _pool.release(buf)
        with _lock:
            if _last.get(target) is fut:
                del _last[target]
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    threading.Thread(target=work, name=f"tensorfile-async-save:{target}", daemon=False).start()
    return fut


def _snapshot(obj: Any) -> tuple[Any, Any, dict[int, str]]:
    """A copy of `obj` whose tensors view one pooled buffer, each original storage as a
    storage of its own over its part of the buffer (so the file keeps the original
    storages, and reading one tensor back reads only its storage); returns (copy,
    buffer, {id(copy): device of the original} for tensors copied from a device)."""
    flattener = Flattener()
    tree = flattener.flatten(obj)
    leaves = flattener.leaves
    torch = flattener._torch
    tensor_type = torch.Tensor if torch is not None else None
    # Group tensors by storage, as the save will, so shared storages stay shared.
    groups: dict[Any, list[Any]] = {}  # key -> [storage, device, lo, hi, buffer offset]
    described: dict[int, tuple[Any, ...]] = {}
    for i, leaf in enumerate(leaves):
        if tensor_type is None or not isinstance(leaf, tensor_type):
            continue

        def error(message: str, i: int = i) -> TypeError:
            return TypeError(
                f"tensorfile.async_save: cannot save the object at key path "
                f"{path_str(flattener.leaf_paths[i])!r}: {message}"
            )

        key, storage, _ptr, first, end, _name, shape, strides, flags = describe(torch, leaf, error)
        described[i] = (key, first, shape, strides, flags)
        g = groups.get(key)
        if g is None:
            groups[key] = [storage, leaf.device, first, end, 0]
        else:
            g[2] = min(g[2], first)
            g[3] = max(g[3], end)
    total = 0
    pinned = False
    for g in groups.values():
        g[2] -= g[2] % _ALIGN
        g[4] = total
        total += -(-(g[3] - g[2]) // _ALIGN) * _ALIGN
        pinned = pinned or g[1].type == "cuda"
    buf = _pool.acquire(torch, total, pinned) if total else None
    if buf is not None:
        devices = set()
        for storage, device, lo, hi, at in groups.values():
            if hi <= lo:
                continue
            src = torch.empty(0, dtype=torch.uint8, device=device).set_(
                storage, lo, (hi - lo,), (1,)
            )
            buf[at : at + hi - lo].copy_(src, non_blocking=device.type == "cuda")
            if device.type == "cuda":
                devices.add(device)
        for device in devices:
            torch.cuda.synchronize(device)  # the caller may overwrite the source after we return
    views: dict[Any, Any] = {}
    if buf is not None:
        base = buf.data_ptr()
        for key, (_storage, _device, lo, hi, at) in groups.items():
            n = max(hi - lo, 0)
            if n:
                mem = (ctypes.c_ubyte * n).from_address(base + at)
                views[key] = torch.frombuffer(mem, dtype=torch.uint8).untyped_storage()
    saved_from: dict[int, str] = {}
    copies: list[Any] = []
    for i, leaf in enumerate(leaves):
        if i not in described:
            copies.append(leaf.copy())  # numpy array
            continue
        key, first, shape, strides, flags = described[i]
        _storage, device, lo, _hi, at = groups[key]
        itemsize = leaf.element_size()
        t = torch.empty(0, dtype=leaf.dtype)
        if key in views:
            t.set_(views[key], (first - lo) // itemsize, shape, strides)
        else:
            t = torch.empty_strided(shape, strides, dtype=leaf.dtype)
        if flags & FLAG_PARAMETER:
            t = torch.nn.Parameter(t, requires_grad=bool(flags & FLAG_REQUIRES_GRAD))
        elif flags & FLAG_REQUIRES_GRAD:
            t.requires_grad_(True)
        if device.type != "cpu":
            saved_from[id(t)] = str(device)
        copies.append(t)
    return Builder(lambda tag, i: copies[i]).build(tree), buf, saved_from


def clear_pool() -> None:
    """Releases the idle snapshot buffers (those of saves still running stay in use)."""
    _pool.clear()
