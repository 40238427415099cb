"""Two-rank torch.distributed.checkpoint benchmark: tensorfile.dcp against FileSystemWriter/Reader.

Each figure is the median over --reps runs of a dcp.save or dcp.load on 2 gloo ranks of
this machine (the slowest rank counts: rank 0 times from a barrier to a barrier). The
stock writer and reader run with thread_count=2. Loads are cold: the checkpoint's pages
are dropped from the page cache (posix_fadvise DONTNEED after the durable save) first,
unless --hot. Ratios are stock time / tensorfile time: above 1, tensorfile is faster.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any

from .rawio import evict

WORLD = 2
SYSTEMS = ("tensorfile", "stock")


def parse_size(text: str) -> int:
    """'1G', '64M', '512K' or a byte count -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 64M, 4096)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value * scale)


def _state(workload: str, a: dict[str, Any], mesh: Any) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    if workload == "large":
        # Sixteen layers of float32, each sharded by rows across the ranks.
        per = max(a["size"] // 16 // 4, 1024)
        cols = 1024 if per >= 1024 * 64 else 16
        rows = max(per // cols, WORLD)
        return {
            f"layer{i}.weight": distribute_tensor(
                torch.randn(rows, cols, generator=g), mesh, [Shard(0)]
            )
            for i in range(16)
        }
    numel = max(a["small_nbytes"] // a["small_count"] // 4, 1)
    # Every rank holds the same plain tensors; DCP's planner spreads them over the ranks.
    return {f"t{i}": torch.randn(numel, generator=g) for i in range(a["small_count"])}


def _empty_like(sd: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.zeros_like(v) for k, v in sd.items()}


def _rank(rank: int, a: dict[str, Any], out: str) -> None:
    try:
        _rank_main(rank, a, out)
    except BaseException:
        with open(f"{out}.error{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def _rank_main(rank: int, a: dict[str, Any], out: str) -> None:
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import tensorfile.dcp as tdcp

    dist.init_process_group(
        "gloo",
        init_method=f"file://{a['dir']}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=a["timeout"]),
    )
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}
    for workload in a["workloads"]:
        sd = _state(workload, a, mesh)
        local = sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in sd.values())
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, local)
        nbytes = sum(gathered) if workload == "large" else local  # small: every rank holds all
        for system in a["systems"]:
            saves, loads = [], []
            for rep in range(a["reps"]):
                path = os.path.join(a["dir"], f"{workload}-{system}-{rep}")
                if system == "tensorfile":
                    writer: Any = tdcp.StorageWriter(path)
                    reader: Any = tdcp.StorageReader(path)
                else:
                    writer = dcp.FileSystemWriter(path, thread_count=2)
                    reader = dcp.FileSystemReader(path)
                dist.barrier()
                t0 = time.perf_counter()
                dcp.save(sd, storage_writer=writer)
                dist.barrier()
                saves.append(time.perf_counter() - t0)
                dest = _empty_like(sd)
                if not a["hot"] and rank == 0:
                    evict(path)
                dist.barrier()
                t0 = time.perf_counter()
                dcp.load(dest, storage_reader=reader)
                dist.barrier()
                loads.append(time.perf_counter() - t0)
                key = next(iter(sd))
                want = sd[key].to_local() if hasattr(sd[key], "to_local") else sd[key]
                got = dest[key].to_local() if hasattr(dest[key], "to_local") else dest[key]
                if not torch.equal(want, got):
                    raise AssertionError(f"{system} {workload}: {key} came back different")
                del dest
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(path, ignore_errors=True)
            results[f"{workload}/{system}"] = {"nbytes": nbytes, "save_s": saves, "load_s": loads}
        del sd
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run(a: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """Runs the benchmark on 2 ranks (fresh interpreters, or processes of the
    multiprocessing context `ctx`); returns {"config", "results", "ratios"}."""
    out = os.path.join(a["dir"], "results.json")
    ctx = ctx or mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, a, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        errors = "".join(
            open(f"{out}.error{r}").read()
            for r in range(WORLD)
            if os.path.exists(f"{out}.error{r}")
        )
        raise RuntimeError(f"bench_dcp: ranks exited with {[p.exitcode for p in procs]}\n{errors}")
    with open(out) as f:
        raw = json.load(f)
    summary: dict[str, Any] = {}
    for r in raw.values():
        r["save_median_s"] = statistics.median(r["save_s"])
        r["load_median_s"] = statistics.median(r["load_s"])
        r["save_gbps"] = r["nbytes"] / r["save_median_s"] / 1e9
        r["load_gbps"] = r["nbytes"] / r["load_median_s"] / 1e9
    for workload in a["workloads"]:
        tf, st = raw.get(f"{workload}/tensorfile"), raw.get(f"{workload}/stock")
        if tf and st:
            summary[workload] = {
                "save_ratio": st["save_median_s"] / tf["save_median_s"],
                "load_ratio": st["load_median_s"] / tf["load_median_s"],
            }
    config = {k: v for k, v in a.items() if k != "dir"}
    return {"config": config, "results": raw, "ratios": summary}


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{'workload':<8} {'system':<11} {'MB':>8} {'save s':>8} {'GB/s':>6} {'load s':>8} {'GB/s':>6}"
    ]
    for key, r in report["results"].items():
        workload, system = key.split("/")
        lines.append(
            f"{workload:<8} {system:<11} {r['nbytes'] / 1e6:>8.1f} {r['save_median_s']:>8.3f} "
            f"{r['save_gbps']:>6.2f} {r['load_median_s']:>8.3f} {r['load_gbps']:>6.2f}"
        )
    targets = {"large": 2.0, "small": 10.0}
    for workload, s in report["ratios"].items():
        want = targets[workload]
        lines.append(
            f"{workload}: tensorfile is {s['save_ratio']:.1f}x stock on save, {s['load_ratio']:.1f}x on load "
            f"(target {want:.0f}x: save {'met' if s['save_ratio'] >= want else 'NOT met'}, "
            f"load {'met' if s['load_ratio'] >= want else 'NOT met'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "bench_dcp", ctx: Any = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="tensorfile.dcp against torch's FileSystemWriter/Reader (thread_count=2) on 2 gloo ranks.",
    )
    p.add_argument(
        "--size", type=parse_size, default=1 << 30, help="large workload bytes, all ranks [1G]"
    )
    p.add_argument(
        "--small-count", type=int, default=20000, help="tensors in the small workload [20000]"
    )
    p.add_argument(
        "--small-size",
        type=parse_size,
        default=165_000_000,
        help="bytes in the small workload [165M]",
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported [3]")
    p.add_argument("--workloads", default="large,small", help="comma-separated: large,small")
    p.add_argument(
        "--systems", default="tensorfile,stock", help="comma-separated: tensorfile,stock"
    )
    p.add_argument("--hot", action="store_true", help="load from the page cache (no eviction)")
    p.add_argument("--dir", default=None, help="where checkpoints go [a temporary directory]")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds a collective may wait [1800]"
    )
    a = p.parse_args(argv)
    workloads = [w for w in a.workloads.split(",") if w]
    systems = [s for s in a.systems.split(",") if s]
    if not workloads or any(w not in ("large", "small") for w in workloads):
        p.error(f"--workloads: choose from large,small, got {a.workloads!r}")
    if not systems or any(s not in SYSTEMS for s in systems):
        p.error(f"--systems: choose from {','.join(SYSTEMS)}, got {a.systems!r}")
    if a.reps < 1 or a.small_count < 1:
        p.error("--reps and --small-count must be at least 1")
    base = a.dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="tensorfile-bench-dcp-", dir=base)
    try:
        report = run(
            {
                "dir": work,
                "size": a.size,
                "small_count": a.small_count,
                "small_nbytes": a.small_size,
                "reps": a.reps,
                "workloads": workloads,
                "systems": systems,
                "hot": a.hot,
                "timeout": a.timeout,
            },
            ctx,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_table(report))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
