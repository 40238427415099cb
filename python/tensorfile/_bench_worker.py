"""The benchmark's child process: measures one system (or the raw I/O limits) on one workload and writes the timings as JSON."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ._workloads import fsync_file, make_durable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CHUNK = 64 << 20  # one large write or read per call, as a tuned copy loop would do
_THREAD_CHUNK = 8 << 20


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def _peak_mib() -> float | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def _trim() -> None:
    # Memory freed by an earlier measure stays in malloc's heap and in RSS; handing it
    # back makes the next measure's base RSS honest and its buffers truly fresh pages.
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+), which gives a
    # peak per measure instead of one for the whole child.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- page cache


def evict(path: str) -> None:
    """Drops the file's pages from the page cache; fsync first because dirty pages stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Reads the whole file once so that its pages are in the page cache."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
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
    """The fraction of the file's pages in the page cache (mincore), to show that an
    eviction took; None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
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
                pages = (size + _PAGE - 1) // _PAGE
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return sum(b & 1 for b in bytes(vec)) / pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def _read_file(path: str, dst: Any, threads: int) -> None:
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
            for off in range(0, size, _CHUNK):
                span(off, min(size, off + _CHUNK))
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


# --------------------------------------------------------------------------- touching


def touch(obj: Any) -> int:
    """Reads one byte of every page of every tensor in `obj` (a dict of tensors), so that a
    memory-mapped load pays for the bytes it returns; returns the sum as a witness."""
    import numpy as np

    spans = []
    for t in obj.values():
        nb = t.numel() * t.element_size()
        if nb:
            spans.append((t.data_ptr(), t.data_ptr() + nb))
    spans.sort()
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = 0
    for a, b in merged:
        arr = np.ctypeslib.as_array((ctypes.c_ubyte * (b - a)).from_address(a))
        total += int(arr[::_PAGE].sum()) + int(arr[-1])
    return total


# --------------------------------------------------------------------------- systems


def _system(name: str) -> dict[str, Callable[..., Any]]:
    if name == "tensorfile":
        import tensorfile

        return {
            "save": lambda sd, p, durable: tensorfile.save(sd, p, durable=durable),
            "load": lambda p: tensorfile.load(p),
            "mmap": lambda p: tensorfile.load(p, mmap=True),
        }
    if name == "torch":
        import torch

        def tsave(sd: Any, p: str, durable: bool) -> None:
            torch.save(sd, p)
            if durable:
                make_durable(p)

        return {
            "save": tsave,
            "load": lambda p: torch.load(p, weights_only=True),
            "mmap": lambda p: torch.load(p, mmap=True, weights_only=True),
        }
    if name == "safetensors":
        from safetensors.torch import load_file, save_file

        def ssave(sd: Any, p: str, durable: bool) -> None:
            save_file(sd, p)
            if durable:
                make_durable(p)

        # load_file maps the file by default; its pread backend is the copy into fresh
        # memory that the other systems' plain loads do.
        return {
            "save": ssave,
            "load": lambda p: load_file(p, backend="pread"),
            "mmap": lambda p: load_file(p),
        }
    raise ValueError(f"unknown system {name!r}")


# --------------------------------------------------------------------------- the child


class _Recorder:
    """Collects measures and rewrites the result file after each, so that a child that
    dies part way still reports what it measured."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"measures": {}}

    def measure(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        inner: bool = False,
        check: Callable[[Any], None] | None = None,
        **extra: Any,
    ) -> None:
        """Times fn() and records its peak RSS, then (untimed) runs check on its result.
        With inner=True, fn times itself and returns the entry's fields."""
        _trim()
        base = _rss_mib()
        per_measure = _reset_peak()
        entry: dict[str, Any] = {"rss_base_mib": base}
        try:
            t0 = time.perf_counter()
            out = fn()
            entry["seconds"] = time.perf_counter() - t0
            entry["rss_peak_mib"] = _peak_mib() if per_measure else None
            if inner:
                entry.update(out)
            if check is not None:
                check(out)
            del out
        except Exception as e:
            entry.pop("seconds", None)
            entry["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry.setdefault("rss_peak_mib", _peak_mib() if per_measure else None)
        entry.update(extra)
        self.data["measures"][name] = entry
        self.flush()

    def note(self, name: str, **extra: Any) -> None:
        self.data["measures"].setdefault(name, {}).update(extra)
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".part"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def _check(obj: Any, spec: dict[str, Any]) -> None:
    n = len(obj)
    nb = sum(t.numel() * t.element_size() for t in obj.values())
    if n != spec["count"] or nb != spec["nbytes"]:
        raise RuntimeError(
            f"wrong result: loaded {n} tensors, {nb} bytes; saved {spec['count']}, {spec['nbytes']}"
        )


def run_raw(spec: dict[str, Any], rec: _Recorder) -> None:
    import numpy as np

    path, size, threads = spec["path"], spec["nbytes"], spec["threads"]
    src = b"\x01" * min(size, _CHUNK)  # one buffer, resident, written over and over

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # Reserve the space first, as tensorfile does: on ext4 writes into reserved
            # extents ran up to 2.7x faster here, and the limit must be the best a writer can do.
            os.posix_fallocate(fd, 0, size)
            left = size
            view = memoryview(src)
            while left:
                left -= os.write(fd, view[: min(left, len(view))])
            os.fsync(fd)
        finally:
            os.close(fd)

    if os.path.exists(path):
        os.unlink(path)
    rec.measure("write_fsync", write)
    dst = np.empty(size, dtype=np.uint8)
    dst.fill(0)  # touched: the limit is for copying into resident memory
    warm(path)

    def best_of(cold: bool) -> dict[str, Any]:
        times = {}
        resident = None
        for n in sorted({1, threads}):
            if cold:
                evict(path)
                resident = resident_fraction(path)
            t0 = time.perf_counter()
            _read_file(path, dst, n)
            times[n] = time.perf_counter() - t0
        best = min(times, key=lambda k: times[k])
        return {
            "seconds": times[best],
            "threads": best,
            "by_threads": {str(k): v for k, v in times.items()},
            "resident_after_evict": resident,
        }

    rec.measure("pagecache_read", lambda: best_of(cold=False), inner=True)
    rec.measure("cold_read", lambda: best_of(cold=True), inner=True)
    big = np.ones(size, dtype=np.uint8)
    rec.measure("memcpy", lambda: np.copyto(dst, big))


def run_system(spec: dict[str, Any], rec: _Recorder) -> None:
    from . import _workloads

    path = spec["path"]
    shapes, dtype = _workloads.shapes_for(spec["workload"], spec["size_mb"], spec["small_count"])
    sys_ = _system(spec["system"])
    # Held in a dict so that dropping it before the loads frees the memory.
    held = {"sd": _workloads.build(shapes, dtype, seed=spec.get("seed", 0))}

    def save(durable: bool) -> None:
        if os.path.exists(path):
            os.unlink(path)
        rec.measure(
            "save_durable" if durable else "save", lambda: sys_["save"](held["sd"], path, durable)
        )

    save(True)
    save(False)
    if os.path.exists(path):
        fsync_file(path)  # so the non-durable save's writeback does not land in a later measure
    held.clear()
    gc.collect()
    if not os.path.exists(path):
        for m in ("load_hot", "load_cold", "mmap_hot", "mmap_cold"):
            rec.note(m, error="not measured: the save made no file")
        return

    def load(kind: str) -> Callable[[], Any]:
        def go() -> Any:
            obj = sys_[kind](path)
            if kind == "mmap":
                touch(obj)
            return obj  # freed after the clock stops, as a caller keeping it would

        return go

    def check(obj: Any) -> None:
        _check(obj, spec)

    warm(path)
    rec.measure("load_hot", load("load"), check=check)
    evict(path)
    rec.measure(
        "load_cold", load("load"), check=check, resident_after_evict=resident_fraction(path)
    )
    warm(path)
    rec.measure("mmap_hot", load("mmap"), check=check)
    evict(path)
    rec.measure(
        "mmap_cold", load("mmap"), check=check, resident_after_evict=resident_fraction(path)
    )


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    rec = _Recorder(spec["result"])
    try:
        if spec["system"] == "raw":
            run_raw(spec, rec)
        else:
            run_system(spec, rec)
    finally:
        rec.data["child_peak_mib"] = _peak_mib()
        rec.flush()
        try:
            os.unlink(spec["path"])
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
