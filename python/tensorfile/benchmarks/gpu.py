"""GPU benchmark: tensorfile load to CUDA (pinned staging and GPUDirect Storage) and save
from CUDA, against torch.load/torch.save and safetensors, as fractions of the limits
measured in the same run (hot and cold disk read, raw write with fsync, pinned
host-to-device copy). Medians of `--repeats` runs; writes a JSON report.

    python bench/gpu_bench.py --size-mb 4096 --dir /data/bench --json out.json

bench/gpu_check.sh runs it on a GPU machine. Without CUDA it measures the host limits
only and says "no CUDA" (exit status 0), so the script can be smoke-tested anywhere.
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

from .rawio import CHUNK, evict, filesystem, make_durable, read_file, warm, write_file
from .workloads import payload_nbytes, transformer_shapes

GB = 1e9


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.report: dict[str, Any] = {
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
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


FIRST_LOAD = r"""
import json, os, subprocess, sys
import tensorfile
out = tensorfile.load(sys.argv[1], map_location="cuda")  # the first CUDA work of this process
q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                    "--format=csv,noheader,nounits"], capture_output=True, text=True)
mine = [ln.split(", ") for ln in q.stdout.splitlines() if ln.split(", ")[0] == str(os.getpid())]
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


def _drop(obj: Any) -> None:
    del obj
    gc.collect()


# ---------------------------------------------------------------------- the benchmark


def host_limits(b: Bench, nbytes: int, probe: str) -> None:
    """The disk's limits in this run: one writer's pwrite + fsync into reserved space, and
    pread into touched memory with 1 and N threads, page cache hot and cold."""
    threads = min(16, len(os.sched_getaffinity(0)))
    src = b"\x01" * min(nbytes, CHUNK)
    b.timed("raw_write_fsync", lambda: write_file(probe, nbytes, 1, src), nbytes, section="limits")
    dst = np.empty(nbytes, dtype=np.uint8)
    dst.fill(0)  # resident: the limit is for reading into touched memory

    def reader(t: int) -> Callable[[], None]:
        return lambda: read_file(probe, dst, t)

    for t in sorted({1, threads}):
        b.timed(f"hot_read_{t}t", reader(t), nbytes, section="limits", before=reader(threads))
        b.timed(f"cold_read_{t}t", reader(t), nbytes, section="limits", before=lambda: evict(probe))
    lim = b.report["limits"]
    for kind in ("hot_read", "cold_read"):
        best = [v["gbps"] for k, v in lim.items() if k.startswith(kind + "_")]
        if best:
            lim[kind] = {"gbps": max(best)}
    os.unlink(probe)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--size-mb", type=float, default=4096, help="the bf16 state dict's size in MiB [4096]"
    )
    ap.add_argument("--dir", required=True, help="a directory on the disk to measure")
    ap.add_argument("--json", required=True, help="where the report goes")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure, median [3]")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="seconds for the whole run; figures that do not fit are skipped [240]",
    )
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The GPU benchmark from the command line; the report goes to --json even when a
    measure fails or SIGTERM stops the run. Returns the exit status."""
    args = parser(prog).parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through `finally`, so the report is written

    signal.signal(signal.SIGTERM, stop)

    import tensorfile

    from .. import _engine

    os.makedirs(args.dir, exist_ok=True)
    b = Bench(args)
    rep = b.report
    shapes = transformer_shapes(int(args.size_mb * (1 << 20)), "bfloat16")
    nbytes = payload_nbytes(shapes, "bfloat16")
    rep["payload_nbytes"] = nbytes
    rep["tensors"] = len(shapes)
    fs = filesystem(args.dir)
    rep["filesystem"] = f"{fs['type']} on {fs['mount']}"
    rep["machine"]["cpus"] = len(os.sched_getaffinity(0))
    b.log(f"payload {nbytes / GB:.2f} GB in {len(shapes)} bf16 tensors; {rep['filesystem']}")

    try:
        torch: Any
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


def gpu_part(b: Bench, torch: Any, tensorfile: Any, shapes: list[Any], nbytes: int) -> None:
    from .. import _config, _engine

    rep = b.report
    d = b.args.dir
    rep["machine"]["gpu"] = torch.cuda.get_device_name(0)
    rep["machine"]["torch"] = torch.__version__
    rep["machine"]["torch_cuda"] = torch.version.cuda
    rep["machine"]["libcudart"] = _engine.cuda_library()
    rep["machine"]["threads"] = _config.num_threads()
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
        make_durable(pt_path)  # what tensorfile's default durable=True does

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
        return lambda: warm(path)

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
    tensorfile.release_staging_buffers()


def pinned_h2d(b: Bench, torch: Any, dev: Any, n: int) -> None:
    """Pinned host-to-device copy bandwidth: `n` bytes in one copy."""
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    gpu_buf = torch.empty(n, dtype=torch.uint8, device=dev)

    def h2d() -> None:
        gpu_buf.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    b.timed("pinned_h2d", h2d, n, warmup=True, section="limits")


# Each ratio's target (at least this much); the other ratios are reported without one.
TARGETS = {
    "tensorfile_load_staging/min(hot_read,pinned_h2d)": 0.8,
    "tensorfile_load_gds/min(hot_read,pinned_h2d)": 0.8,
    "tensorfile_load_staging/safetensors_load": 2.0,
    "tensorfile_load_gds/safetensors_load": 2.0,
    "tensorfile_save_staging/raw_write_fsync": 0.8,
    "tensorfile_save_gds/raw_write_fsync": 0.8,
}


def ratios(
    limits: dict[str, Any], results: dict[str, Any]
) -> tuple[float | None, dict[str, float]]:
    """The load limit (the lower of the hot read and the pinned host-to-device copy: a
    load to CUDA needs both) and every result over its limit and over its peers, from the
    GB/s of `limits` and `results` ({name: {"gbps": ...}}); a ratio with a figure missing
    is left out."""

    def g(section: dict[str, Any], key: str) -> float | None:
        v = section.get(key)
        return v["gbps"] if v else None

    hot, h2d = g(limits, "hot_read"), g(limits, "pinned_h2d")
    have = [x for x in (hot, h2d) if x]
    load_limit = min(have) if have else None
    out: dict[str, float] = {}

    def put(name: str, x: float | None, over: float | None) -> None:
        if x and over:
            out[name] = x / over

    for name in ("tensorfile_load_staging", "tensorfile_load_gds"):
        x = g(results, name)
        put(f"{name}/min(hot_read,pinned_h2d)", x, load_limit)
        put(f"{name}/safetensors_load", x, g(results, "safetensors_load"))
        put(f"{name}/torch_load", x, g(results, "torch_load"))
    put(
        "tensorfile_load_staging_cold/cold_read",
        g(results, "tensorfile_load_staging_cold"),
        g(limits, "cold_read"),
    )
    for name in ("tensorfile_save_staging", "tensorfile_save_gds"):
        x = g(results, name)
        put(f"{name}/raw_write_fsync", x, g(limits, "raw_write_fsync"))
        put(f"{name}/torch_save", x, g(results, "torch_save"))
    return load_limit, out


def targets(rat: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target whose ratio was measured: the ratio, the bar and whether it is met."""
    return {
        k: {"ratio": rat[k], "at_least": bar, "met": rat[k] >= bar}
        for k, bar in TARGETS.items()
        if k in rat
    }


def write_report(b: Bench, path: str) -> None:
    rep = b.report
    lim, res = rep["limits"], rep["results"]
    rep["load_limit_gbps"], rat = ratios(lim, res)
    rep["ratios"] = rat
    rep["targets"] = targets(rat)
    rep["elapsed_s"] = time.monotonic() - b.t_start
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
    print("\nlimits (GB/s):", {k: round(v["gbps"], 2) for k, v in lim.items()})
    print("results (GB/s):", {k: round(v["gbps"], 2) for k, v in res.items()})
    print("ratios:", {k: round(v, 3) for k, v in rat.items()})
    for k, t in rep["targets"].items():
        print(f"{'met   ' if t['met'] else 'MISSED'} {k} >= {t['at_least']}: {t['ratio']:.3f}")
    if rep["errors"]:
        print("errors:", rep["errors"])
    print(f"report written to {path}")


if __name__ == "__main__":
    sys.exit(main())
