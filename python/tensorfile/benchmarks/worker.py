"""The benchmark's fork server: imports every system once, then forks one child per (workload, system, measure) so that each figure and its peak RSS belong to one process."""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable

from . import workloads
from .rawio import (
    CHUNK,
    PAGE,
    evict,
    files_of,
    fsync_file,
    make_durable,
    read_file,
    remove,
    resident_fraction,
    thread_counts,
    warm,
    write_file,
)
from .workloads import tensors_in

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


# --------------------------------------------------------------------------- touching


def touch(obj: Any) -> int:
    """Reads one byte of every page of every tensor in `obj` (any nest of containers), so
    that a memory-mapped load pays for the bytes it returns; returns the sum as a witness."""
    import numpy as np

    spans = []
    for t in tensors_in(obj):
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
        total += int(arr[::PAGE].sum()) + int(arr[-1])
    return total


# --------------------------------------------------------------------------- systems

# The module each system needs: a system whose module is missing is "not installed".
MODULES = {
    "tensorfile": "tensorfile",
    "torch": "torch",
    "safetensors": "safetensors.torch",
    "numpy": "numpy",
    "dcp": "torch.distributed.checkpoint",
    "tensorizer": "tensorizer",
    "tf:torch.save": "tensorfile",
    "tf:safetensors": "safetensors.torch",
}

# What a system cannot do at all (rather than fails at): the measure is shown as n/a.
UNSUPPORTED = {
    (
        "numpy",
        "mmap",
    ): "np.load maps only single .npy files; np.savez archives are read into memory",
    ("dcp", "mmap"): "torch.distributed.checkpoint has no memory-mapped load",
    ("tensorizer", "mmap"): "tensorizer has no memory-mapped load",
}


def _flat_tensors(obj: Any, who: str) -> dict[str, Any]:
    """The flat {name: tensor} dict the format takes; anything else is refused by name, as
    the library itself would refuse (or silently pickle) it."""
    if not isinstance(obj, dict):
        raise TypeError(f"{who} takes a flat dict of tensors, got {type(obj).__name__}")
    for k, v in obj.items():
        if not (hasattr(v, "data_ptr") and hasattr(v, "element_size")):
            raise TypeError(
                f"{who} takes a flat dict of tensors; {k!r} is a {type(v).__name__} "
                "(nested checkpoints need flattening or a second file)"
            )
    return obj


def system(name: str, cores: int) -> dict[str, Callable[..., Any]]:
    """save(obj, path, durable, threads), load(path, threads, template) and mmap(path) of
    a system, each called as that system's users call it. `threads` is only honoured by
    tensorfile (the thread sweep); `template` is the untouched destination that
    torch.distributed.checkpoint loads into, built by the caller inside the timing."""
    if name == "tensorfile":
        import tensorfile

        return {
            "save": lambda sd, p, durable, threads: tensorfile.save(
                sd, p, durable=durable, num_threads=threads
            ),
            "load": lambda p, threads, template: tensorfile.load(p, num_threads=threads),
            "mmap": lambda p: tensorfile.load(p, mmap=True),
        }
    if name in ("tf:torch.save", "tf:safetensors"):
        # Files the peer wrote (its own save), loaded by tensorfile.
        import tensorfile

        peer = system("torch" if name == "tf:torch.save" else "safetensors", cores)
        return {
            "save": peer["save"],
            "load": lambda p, threads, template: tensorfile.load(p, num_threads=threads),
            "mmap": lambda p: tensorfile.load(p, mmap=True),
        }
    if name == "torch":
        import torch

        def tsave(sd: Any, p: str, durable: bool, threads: Any) -> None:
            torch.save(sd, p)
            if durable:
                make_durable(p)

        return {
            "save": tsave,
            "load": lambda p, threads, template: torch.load(p, weights_only=True),
            "mmap": lambda p: torch.load(p, mmap=True, weights_only=True),
        }
    if name == "safetensors":
        from safetensors.torch import load_file, save_file

        def ssave(sd: Any, p: str, durable: bool, threads: Any) -> None:
            save_file(sd, p)
            if durable:
                make_durable(p)

        # load_file maps the file by default; its pread backend is the copy into fresh
        # memory that the other systems' plain loads do.
        return {
            "save": ssave,
            "load": lambda p, threads, template: load_file(p, backend="pread"),
            "mmap": lambda p: load_file(p),
        }
    if name == "numpy":
        import numpy as np
        import torch

        def nsave(sd: Any, p: str, durable: bool, threads: Any) -> None:
            # One .npz archive (np.savez, uncompressed) per state dict: numpy's own way to
            # keep named arrays in one file. Tensors are handed over without a copy.
            arrays = {k: v.numpy() for k, v in _flat_tensors(sd, "np.savez").items()}
            with open(p, "wb") as f:  # a file object, so np.savez adds no ".npz"
                np.savez(f, **arrays)
            if durable:
                make_durable(p)

        def nload(p: str, threads: Any, template: Any) -> Any:
            with np.load(p) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}

        return {"save": nsave, "load": nload}
    if name == "dcp":
        import torch.distributed.checkpoint as dcp

        def dsave(sd: Any, p: str, durable: bool, threads: Any) -> None:
            # No process group: DCP saves from this one process (its no_dist path).
            writer = dcp.FileSystemWriter(p, thread_count=cores, sync_files=durable)
            dcp.save(sd, storage_writer=writer)
            if durable:
                make_durable(p)

        def dload(p: str, threads: Any, template: Any) -> Any:
            dcp.load(template, storage_reader=dcp.FileSystemReader(p))
            return template

        return {"save": dsave, "load": dload}
    if name == "tensorizer":
        from tensorizer import TensorDeserializer, TensorSerializer

        def zsave(sd: Any, p: str, durable: bool, threads: Any) -> None:
            ser = TensorSerializer(p)
            ser.write_state_dict(sd)
            ser.close()
            if durable:
                make_durable(p)

        def zload(p: str, threads: Any, template: Any) -> Any:
            de = TensorDeserializer(p, device="cpu")
            out = dict(de.items())
            de.close()
            return out

        return {"save": zsave, "load": zload}
    raise ValueError(f"unknown system {name!r}")


# --------------------------------------------------------------------------- measuring


def _error(e: BaseException) -> dict[str, Any]:
    return {
        "error": f"{type(e).__name__}: {e}".strip().splitlines()[0][:500],
        "traceback": traceback.format_exc()[-4000:],
    }


def _start() -> dict[str, Any]:
    """The baseline: RSS after the imports and the payload, with the peak reset to it."""
    _trim()
    entry = {"rss_base_mib": _rss_mib()}
    entry["peak_reset"] = _reset_peak()
    return entry


# The payload of the current (rep, workload), built once by the server before it forks
# the save children, which share its pages; dropped before the load children.
_PAYLOAD: dict[str, Any] = {}


def _payload_key(job: dict[str, Any]) -> tuple[Any, ...]:
    return (job["rep"], job["workload"], job["size_mb"], job["small_count"])


def payload_for(job: dict[str, Any]) -> Any:
    """The object to save: the server's, or (outside the server) a freshly built one."""
    if _PAYLOAD.get("key") == _payload_key(job):
        return _PAYLOAD["obj"]
    return workloads.build_workload(job["workload"], job["size_mb"], job["small_count"])


def _hold_payload(job: dict[str, Any] | None) -> None:
    """Builds the job's payload in the server (through numpy: no torch thread pool may
    start before a fork), or drops the one held, handing its memory back."""
    key = None if job is None else _payload_key(job)
    if _PAYLOAD.get("key") == key:
        return
    _PAYLOAD.clear()
    gc.collect()
    _trim()
    if job is not None:
        _PAYLOAD["obj"] = workloads.build_workload(
            job["workload"], job["size_mb"], job["small_count"], fork_safe=True
        )
        _PAYLOAD["key"] = key
        gc.freeze()  # the children's gc passes skip it, and so leave its pages shared


def _check(obj: Any, job: dict[str, Any]) -> None:
    ts = tensors_in(obj)
    nb = sum(t.numel() * t.element_size() for t in ts)
    if len(ts) != job["count"] or nb != job["nbytes"]:
        raise RuntimeError(
            f"wrong result: loaded {len(ts)} tensors, {nb} bytes; saved {job['count']}, {job['nbytes']}"
        )


def run_raw(job: dict[str, Any]) -> dict[str, Any]:
    """One raw limit: the best the plain system calls achieve over 1..N threads."""
    import numpy as np

    path, size, measure = job["path"], job["nbytes"], job["measure"]
    counts = thread_counts(job["cores"])
    if measure == "write_fsync":
        src = b"\x01" * min(size, CHUNK)  # one buffer, resident, written over and over
        entry = _start()
        times: dict[int, float] = {}
        early: dict[int, float] = {}  # the same with early writeback
        for n in counts:
            for writeback, into in ((False, times), (True, early)):
                remove(path)
                t0 = time.perf_counter()
                write_file(path, size, n, src, writeback)
                into[n] = time.perf_counter() - t0
        best = min(times, key=lambda k: times[k])
        best_early = min(early, key=lambda k: early[k])
        entry.update(by_threads=times, by_threads_writeback=early)
        if early[best_early] < times[best]:
            entry.update(seconds=early[best_early], threads=best_early, writeback=True)
        else:
            entry.update(seconds=times[best], threads=best, writeback=False)
        entry["rss_peak_mib"] = _peak_mib()
        return entry
    if measure == "memcpy":
        dst = np.empty(size, dtype=np.uint8)
        dst.fill(0)
        big = np.ones(size, dtype=np.uint8)
        entry = _start()
        t0 = time.perf_counter()
        np.copyto(dst, big)
        entry["seconds"] = time.perf_counter() - t0
        entry["rss_peak_mib"] = _peak_mib()
        return entry
    if not os.path.exists(path):
        raise RuntimeError("not measured: the raw write made no file")
    cold = measure == "cold_read"
    dst = np.empty(size, dtype=np.uint8)
    dst.fill(0)  # touched: the limit is for copying into resident memory
    warm(path)
    entry = _start()
    times = {}
    resident = None
    for n in counts:
        if cold:
            evict(path)
            resident = resident_fraction(path)
        t0 = time.perf_counter()
        read_file(path, dst, n)
        times[n] = time.perf_counter() - t0
    best = min(times, key=lambda k: times[k])
    entry.update(seconds=times[best], threads=best, by_threads=times)
    entry["rss_peak_mib"] = _peak_mib()
    if cold:
        entry["resident_after_evict"] = resident
    return entry


def _header_times(job: dict[str, Any], reps: int = 7) -> dict[str, Any]:
    """Median wall time of tensorfile's per-tensor Python work for the workload: saving,
    flatten + plan + header encode; loading, the header read, parse and validation.

    One untimed call comes first (its time is kept as `first_s`): in a child forked from
    the server it also pays the copy-on-write faults of the payload's pages, which a
    process that built its own state dict never pays, and this figure is the cost of
    every save and open, as a training loop pays it."""
    import tensorfile
    from tensorfile import _plan
    from tensorfile._tree import no_gc

    if job["measure"] == "header_save":
        obj = payload_for(job)

        def once() -> None:
            with no_gc():  # as tensorfile.save runs it
                _plan.plan_and_encode(obj, None)
    else:
        if not os.path.exists(job["path"]):
            raise RuntimeError("not measured: the save made no file")
        warm(job["path"])

        def once() -> None:
            with tensorfile.open(job["path"]) as f:
                n = len(f)
            if n != job["count"]:
                raise RuntimeError(
                    f"wrong result: the header lists {n} tensors, not {job['count']}"
                )

    entry = _start()
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    entry.update(seconds=statistics.median(times[1:]), samples=times[1:], first_s=times[0])
    entry["rss_peak_mib"] = _peak_mib()
    return entry


def run_system(job: dict[str, Any], fns: dict[str, Callable[..., Any]]) -> dict[str, Any]:
    """One (system, measure): a save of a freshly built payload, or a load of the file
    the saves left."""
    path, measure, threads = job["path"], job["measure"], job.get("threads")
    if measure.startswith("header_"):
        return _header_times(job)
    if measure in ("save_durable", "save"):
        obj = payload_for(job)
        remove(path)
        entry = _start()
        t0 = time.perf_counter()
        fns["save"](obj, path, measure == "save_durable", threads)
        entry["seconds"] = time.perf_counter() - t0
        entry["rss_peak_mib"] = _peak_mib()
        if os.path.exists(path):
            # So that the non-durable save's writeback does not land in a later measure.
            for p in files_of(path):
                fsync_file(p)
        return entry
    if not os.path.exists(path):
        raise RuntimeError("not measured: the save made no file")
    kind = "mmap" if measure.startswith("mmap") else "load"
    cold = measure.endswith("cold")
    if cold:
        evict(path)
    else:
        warm(path)
    resident = resident_fraction(path) if cold else None
    entry = _start()
    t0 = time.perf_counter()
    if kind == "mmap":
        obj = fns["mmap"](path)
        touch(obj)
    else:
        template = None
        if job["system"] == "dcp":
            # DCP loads in place: the caller allocates the destination (fresh, untouched
            # memory, as every other load allocates its own) inside the timing.
            template = workloads.build_workload(
                job["workload"], job["size_mb"], job["small_count"], empty=True
            )
        obj = fns["load"](path, threads, template)
    entry["seconds"] = time.perf_counter() - t0
    entry["rss_peak_mib"] = _peak_mib()
    if cold:
        entry["resident_after_evict"] = resident
    _check(obj, job)  # untimed: the figure counts only if the bytes came back
    return entry


# --------------------------------------------------------------------------- the server


def _child(job: dict[str, Any], fns: dict[str, Any] | None, out: str) -> None:
    """Runs in the forked child: one measure, its entry written to `out`."""
    try:
        if job["system"] == "raw":
            entry = run_raw(job)
        else:
            assert fns is not None
            entry = run_system(job, fns)
    except BaseException as e:
        entry = _error(e)
        entry.pop("seconds", None)
    tmp = out + ".part"
    with open(tmp, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, out)


def _fork_and_wait(
    job: dict[str, Any], fns: dict[str, Any] | None, timeout: float
) -> dict[str, Any]:
    out = job["path"] + f".{os.getpid()}.result.json"
    try:
        os.unlink(out)
    except FileNotFoundError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the server's loop
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _child(job, fns, out)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"error": f"timed out after {timeout:.0f} s"}
        else:
            time.sleep(0.005)
    try:
        with open(out) as f:
            entry: dict[str, Any] = json.load(f)
        os.unlink(out)
    except (OSError, ValueError):
        if os.WIFSIGNALED(status):
            why = f"killed by signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"
        else:
            why = f"exited with status {os.WEXITSTATUS(status)}"
        entry = {"error": f"the measuring child {why} without a result"}
    return entry


def serve(jobs_path: str, results_path: str) -> int:
    """Runs every job of the plan in order, one forked child each, appending each result
    as a JSON line (so a server that dies part way still leaves what it measured) and
    printing a progress line per job."""
    with open(jobs_path) as f:
        plan = json.load(f)
    jobs, cores = plan["jobs"], plan["cores"]
    # Import every system here, before any fork and before any tensor exists, so that a
    # child starts with the modules loaded and no thread pool yet started.
    fns: dict[str, Any] = {}
    broken: dict[str, str] = {}
    for name in plan["systems"]:
        try:
            importlib.import_module(MODULES[name])
            fns[name] = system(name, cores)
        except Exception as e:
            broken[name] = f"import failed: {type(e).__name__}: {e}".splitlines()[0][:500]
    # Objects alive now are never collected in the children: frozen, a child's gc passes
    # skip them instead of writing to (and so copying) every page of the imported modules.
    gc.collect()
    gc.freeze()
    saved: set[str] = set()  # paths that a save of the current group wrote
    with open(results_path, "a") as results:
        for k, job in enumerate(jobs):
            is_save = job["measure"] in ("save_durable", "save", "write_fsync")
            if job["system"] != "raw":
                _hold_payload(job if job["phase"] == "save" else None)
            t0 = time.perf_counter()
            if job["system"] in broken:
                entry: dict[str, Any] = {"error": broken[job["system"]]}
            elif (
                not is_save
                and job["measure"] not in ("memcpy", "header_save")
                and job["path"] not in saved
            ):
                # A file a failed save left behind is not the system's file: loading it
                # would report the damage as a load failure.
                entry = {
                    "error": "not measured: every save of this system failed (see its save rows)"
                }
            else:
                entry = _fork_and_wait(job, fns.get(job["system"]), job["timeout"])
            entry["wall_s"] = time.perf_counter() - t0
            if is_save and "seconds" in entry:
                saved.add(job["path"])
            for p in job.get("cleanup", []):
                remove(p)
                saved.discard(p)
            results.write(json.dumps({"job": k, "entry": entry}) + "\n")
            results.flush()
            print(f"{k + 1}\t{len(jobs)}\t{job['label']}: {entry['wall_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2]))
