"""GPU benchmark: tensorfile load to CUDA (pinned staging and GPUDirect Storage) and save
from CUDA, against torch.load/torch.save and safetensors, as fractions of the limits
measured in the same run (hot and cold disk read, raw write with fsync, pinned
host-to-device copy). Medians of `--repeats` runs; writes a JSON report.

    python bench/gpu_bench.py --size-mb 4096 --dir /data/bench --json out.json

Without CUDA it measures the host limits only and says "no CUDA" (exit status 0), so
the script can be smoke-tested anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

GB = 1e9


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.report: dict[str, Any] = {
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
            "limits": {},
            "results": {},
            "ratios": {},
            "errors": {},
            "skipped": [],
        }

    # ------------------------------------------------------------------ bookkeeping
    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t_start)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:7.1f}s] {msg}", flush=True)

    def phase(self, name: str, fn: Callable[[], Any], need_s: float = 5.0) -> Any:
        """Runs one measurement; a failure is logged and recorded, and the rest go on."""
        if self.left() < need_s:
            self.log(f"{name}: skipped (out of time budget)")
            self.report["skipped"].append(name)
            return None
        try:
            return fn()
        except Exception as e:  # SystemExit (the time guard) passes
            self.log(f"{name}: FAILED: {type(e).__name__}: {e}")
            self.report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None

    def timed(
        self,
        name: str,
        fn: Callable[[], Any],
        nbytes: int,
        before: Callable[[], Any] | None = None,
        warmup: bool = False,
        section: str = "results",
    ) -> dict[str, Any] | None:
        """Median of up to `repeats` timed runs of fn() (before() untimed each time)."""

        def run() -> dict[str, Any]:
            times: list[float] = []
            cpu: list[float] = []
            first = None
            if warmup:
                if before:
                    before()
                t0 = time.perf_counter()
                _drop(fn())
                first = time.perf_counter() - t0
            for i in range(self.args.repeats):
                if i and self.left() < 3 * (times[-1] if times else 1):
                    break  # keep within the budget: fewer repeats, noted in the report
                if before:
                    before()
                c0, t0 = _cpu_seconds(), time.perf_counter()
                _drop(fn())
                times.append(time.perf_counter() - t0)
                cpu.append(_cpu_seconds() - c0)
            med = statistics.median(times)
            out = {"seconds": med, "gbps": nbytes / med / GB, "runs": times}
            # CPU time of the whole process (every thread) per GB moved: the cost of a
            # transfer that wall time hides, e.g. threads spinning on the device.
            out["cpu_s_per_gb"] = statistics.median(cpu) / (nbytes / GB)
            if first is not None:
                out["first_run_seconds"] = first
            self.report[section][name] = out
            self.log(f"{name}: {out['gbps']:.2f} GB/s (median {med:.3f}s of {len(times)})")
            return out

        return self.phase(name, run)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _drop(obj: Any) -> None:
    del obj
    gc.collect()


FIRST_LOAD = r"""
import json, os, subprocess, sys
import tensorfile
out = tensorfile.load(sys.argv[1], map_location="cuda")  # the first CUDA work of this process
q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                    "--format=csv,noheader,nounits"], capture_output=True, text=True)
mine = [ln.split(", ") for ln in q.stdout.splitlines() if ln.split(", ")[0] == str(os.getpid())]
import torch
free, total = torch.cuda.mem_get_info()
print("RESULT " + json.dumps({"devices_with_memory": len(mine),
                              "process_mib": sum(int(m[2]) for m in mine),
                              "tensors_mib": sum(t.numel() * t.element_size() for t in out.values()) / 2**20}))
"""


def first_load_memory(b: Bench, path: str) -> dict[str, Any]:
    """GPU memory a fresh process holds after one tensorfile.load to CUDA with no torch
    CUDA work before it: the tensors plus one primary context, on one device only."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", FIRST_LOAD, path], capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"child failed: {proc.stdout[-500:]} {proc.stderr[-1500:]}")
    rep = json.loads(lines[-1][len("RESULT ") :])
    rep["overhead_mib"] = rep["process_mib"] - rep["tensors_mib"]
    b.report["memory_after_first_load"] = rep
    b.log(f"memory after one load: {rep}")
    return rep


# ---------------------------------------------------------------------- host I/O helpers


def evict(path: str) -> None:
    from tensorfile._workloads import evict as drop

    drop(path)


def read_file(path: str, dst: np.ndarray, threads: int, chunk: int = 8 << 20) -> None:
    """preads the whole file into `dst` with `threads` threads (the raw read limit)."""
    from concurrent.futures import ThreadPoolExecutor

    view = memoryview(dst).cast("B")
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:

        def span(off: int) -> None:
            end = min(size, off + chunk)
            while off < end:
                n = os.preadv(fd, [view[off:end]], off)
                if n <= 0:
                    raise OSError(f"{path}: short read at {off}")
                off += n

        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(span, o) for o in range(0, size, chunk)]:
                f.result()
    finally:
        os.close(fd)


def raw_write(path: str, nbytes: int) -> None:
    """Reserve, write and fsync `nbytes`: the best a writer can do on this disk."""
    src = memoryview(b"\x01" * (64 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        left = nbytes
        while left:
            left -= os.write(fd, src[: min(left, len(src))])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filesystem(path: str) -> str:
    best, fs = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if (
                    len(parts) > 2
                    and os.path.abspath(path).startswith(parts[1])
                    and len(parts[1]) > len(best)
                ):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return f"{fs} on {best}"


# ---------------------------------------------------------------------- the benchmark


def host_limits(b: Bench, nbytes: int, probe: str) -> None:
    threads = min(16, len(os.sched_getaffinity(0)))
    b.timed("raw_write_fsync", lambda: raw_write(probe, nbytes), nbytes, section="limits")
    dst = np.empty(nbytes, dtype=np.uint8)
    dst.fill(0)  # resident: the limit is for reading into touched memory
    for t in sorted({1, threads}):
        b.timed(
            f"hot_read_{t}t",
            lambda t=t: read_file(probe, dst, t),
            nbytes,
            section="limits",
            before=lambda: read_file(probe, dst, threads),
        )
        b.timed(
            f"cold_read_{t}t",
            lambda t=t: read_file(probe, dst, t),
            nbytes,
            section="limits",
            before=lambda: evict(probe),
        )
    lim = b.report["limits"]
    for kind in ("hot_read", "cold_read"):
        best = [v["gbps"] for k, v in lim.items() if k.startswith(kind + "_")]
        if best:
            lim[kind] = {"gbps": max(best)}
    os.unlink(probe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=4096)
    ap.add_argument("--dir", required=True, help="a directory on the disk to measure")
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through `finally`, so the report is written

    signal.signal(signal.SIGTERM, stop)

    import tensorfile
    from tensorfile import _engine
    from tensorfile._workloads import payload_nbytes, transformer_shapes

    os.makedirs(args.dir, exist_ok=True)
    b = Bench(args)
    rep = b.report
    shapes = transformer_shapes(int(args.size_mb * (1 << 20)), "bfloat16")
    nbytes = payload_nbytes(shapes, "bfloat16")
    rep["payload_nbytes"] = nbytes
    rep["tensors"] = len(shapes)
    rep["filesystem"] = filesystem(args.dir)
    rep["machine"]["cpus"] = len(os.sched_getaffinity(0))
    b.log(f"payload {nbytes / GB:.2f} GB in {len(shapes)} bf16 tensors; {rep['filesystem']}")

    try:
        try:
            import torch
        except ImportError:
            torch = None
        cuda = torch is not None and tensorfile.cuda_available()
        rep["cuda"] = bool(cuda)
        host_limits(b, nbytes, os.path.join(args.dir, "limit.bin"))
        if not cuda:
            why = _engine.cuda_error() if torch is not None else "torch is not installed"
            b.log(f"no CUDA: GPU measurements skipped ({why or 'torch sees no device'})")
            rep["no_cuda"] = why or "torch sees no CUDA device"
            return 0
        gpu_part(b, torch, tensorfile, shapes, nbytes)
    finally:
        write_report(b, args.json)
    return 0


def gpu_part(b: Bench, torch: Any, tensorfile: Any, shapes: list, nbytes: int) -> None:
    from tensorfile import _cuda

    rep = b.report
    d = b.args.dir
    rep["machine"]["gpu"] = torch.cuda.get_device_name(0)
    rep["machine"]["torch"] = torch.__version__
    rep["machine"]["torch_cuda"] = torch.version.cuda
    rep["machine"]["libcudart"] = tensorfile._engine.cuda_library()
    rep["machine"]["threads"] = tensorfile._config.num_threads()
    dev = torch.device("cuda", 0)

    pinned_h2d(b, torch, dev, min(nbytes, 1 << 30))
    torch.cuda.empty_cache()

    b.log("building the state dict on the GPU")
    gen = torch.Generator(device=dev).manual_seed(0)
    sd = {
        name: torch.randn(shape, dtype=torch.bfloat16, device=dev, generator=gen)
        for name, shape in shapes
    }
    torch.cuda.synchronize()
    tf_path, pt_path, st_path = (os.path.join(d, f) for f in ("m.tf", "m.pt", "m.safetensors"))

    # Saves from CUDA, durable for everyone (tensorfile fsyncs by default).
    os.environ["TENSORFILE_GDS"] = "off"
    b.timed("tensorfile_save_staging", lambda: tensorfile.save(sd, tf_path), nbytes, warmup=True)
    os.environ["TENSORFILE_GDS"] = "on"
    b.timed("tensorfile_save_gds", lambda: tensorfile.save(sd, tf_path + ".gds"), nbytes)
    os.environ["TENSORFILE_GDS_REGISTER"] = "0"  # cuFile's own bounce buffers instead
    b.timed(
        "tensorfile_save_gds_unregistered", lambda: tensorfile.save(sd, tf_path + ".gds"), nbytes
    )
    del os.environ["TENSORFILE_GDS_REGISTER"]
    if os.path.exists(tf_path + ".gds"):
        os.unlink(tf_path + ".gds")
    os.environ["TENSORFILE_GDS"] = "off"

    def torch_save() -> None:
        torch.save(sd, pt_path)
        fsync_path(pt_path)

    b.timed("torch_save", torch_save, nbytes)

    def st_save() -> None:
        from safetensors.torch import save_file

        save_file(sd, st_path)

    b.phase("safetensors_file", st_save)

    def check(out: Any) -> Any:
        bad = [k for k, v in sd.items() if out[k].device != dev or not torch.equal(out[k], v)]
        if bad:
            raise AssertionError(f"{len(bad)} tensors differ after loading, e.g. {bad[0]}")
        return out

    def hot(path: str) -> Callable[[], None]:
        return lambda: read_file_to_null(path)

    def load_tf() -> Any:
        out = tensorfile.load(tf_path, map_location="cuda")
        torch.cuda.synchronize()
        return out

    b.phase("tensorfile_check", lambda: _drop(check(load_tf())))
    os.environ["TENSORFILE_GDS"] = "off"
    b.timed("tensorfile_load_staging", load_tf, nbytes, before=hot(tf_path), warmup=True)
    os.environ["TENSORFILE_GDS"] = "on"
    b.timed("tensorfile_load_gds", load_tf, nbytes, before=hot(tf_path), warmup=True)
    os.environ["TENSORFILE_GDS_REGISTER"] = "0"
    b.timed("tensorfile_load_gds_unregistered", load_tf, nbytes, before=hot(tf_path))
    del os.environ["TENSORFILE_GDS_REGISTER"]
    os.environ["TENSORFILE_GDS"] = "off"
    b.phase("memory_after_first_load", lambda: first_load_memory(b, tf_path), need_s=30)
    b.timed("tensorfile_load_staging_cold", load_tf, nbytes, before=lambda: evict(tf_path))

    def load_pt() -> Any:
        out = torch.load(pt_path, map_location="cuda")
        torch.cuda.synchronize()
        return out

    b.timed("torch_load", load_pt, nbytes, before=hot(pt_path))

    def load_st() -> Any:
        from safetensors.torch import load_file

        out = load_file(st_path, device="cuda")
        torch.cuda.synchronize()
        return out

    b.timed("safetensors_load", load_st, nbytes, before=hot(st_path))
    _cuda.release_staging()


def pinned_h2d(b: Bench, torch: Any, dev: Any, n: int) -> None:
    """Pinned host-to-device copy bandwidth: `n` bytes in one copy."""
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    gpu_buf = torch.empty(n, dtype=torch.uint8, device=dev)

    def h2d() -> None:
        gpu_buf.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    b.timed("pinned_h2d", h2d, n, warmup=True, section="limits")


def read_file_to_null(path: str) -> None:
    """Brings the file into the page cache."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while (n := os.preadv(fd, [view], off)) > 0:
            off += n
    finally:
        os.close(fd)


def write_report(b: Bench, path: str) -> None:
    rep = b.report
    lim, res, rat = rep["limits"], rep["results"], rep["ratios"]

    def g(section: dict[str, Any], key: str) -> float | None:
        v = section.get(key)
        return v["gbps"] if v else None

    hot, h2d, write = g(lim, "hot_read"), g(lim, "pinned_h2d"), g(lim, "raw_write_fsync")
    load_limit = min(x for x in (hot, h2d) if x) if (hot or h2d) else None
    rep["load_limit_gbps"] = load_limit
    for name in ("tensorfile_load_staging", "tensorfile_load_gds"):
        x = g(res, name)
        if x and load_limit:
            rat[f"{name}/min(hot_read,pinned_h2d)"] = x / load_limit  # target >= 0.8
        if x and g(res, "safetensors_load"):
            rat[f"{name}/safetensors_load"] = x / g(res, "safetensors_load")  # target >= 2
        if x and g(res, "torch_load"):
            rat[f"{name}/torch_load"] = x / g(res, "torch_load")
    x, cold = g(res, "tensorfile_load_staging_cold"), g(lim, "cold_read")
    if x and cold:
        rat["tensorfile_load_staging_cold/cold_read"] = x / cold
    for name in ("tensorfile_save_staging", "tensorfile_save_gds"):
        x = g(res, name)
        if x and write:
            rat[f"{name}/raw_write_fsync"] = x / write  # target >= 0.8
        if x and g(res, "torch_save"):
            rat[f"{name}/torch_save"] = x / g(res, "torch_save")
    rep["elapsed_s"] = time.monotonic() - b.t_start
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
    print("\nlimits (GB/s):", {k: round(v["gbps"], 2) for k, v in lim.items()})
    print("results (GB/s):", {k: round(v["gbps"], 2) for k, v in res.items()})
    print("ratios:", {k: round(v, 3) for k, v in rat.items()})
    if rep["errors"]:
        print("errors:", rep["errors"])
    print(f"report written to {path}")


if __name__ == "__main__":
    sys.exit(main())
