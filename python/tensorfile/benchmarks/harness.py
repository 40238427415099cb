"""The benchmark behind `tensorfile bench`: tensorfile against the machine's raw I/O limits and its peers (torch, safetensors, numpy, torch.distributed.checkpoint, tensorizer), every (system, measure) in its own child process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NoReturn

from .rawio import filesystem, thread_counts
from .workloads import WORKLOADS, describe

# The peers first in the order of the table; tensorfile is the system under test.
SYSTEMS = (
    "tensorfile",
    "torch",
    "safetensors",
    "numpy",
    "dcp",
    "tensorizer",
    "tf:torch.save",
    "tf:safetensors",
)
PEERS = ("torch", "safetensors", "numpy", "dcp", "tensorizer")
# tensorfile reading files the peers wrote: saved by that peer, loaded by tensorfile.
CROSS = {"tf:torch.save": "torch", "tf:safetensors": "safetensors"}
RAW = "raw"

# The module that must import for a system to count as installed.
_MODULE = {
    "tensorfile": "tensorfile",
    "torch": "torch",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "dcp": "torch.distributed.checkpoint",
    "tensorizer": "tensorizer",
    "tf:torch.save": "tensorfile",
    "tf:safetensors": "safetensors",
}

# (key, label, the raw limit it is compared with: None for the limits themselves)
MEASURES: list[tuple[str, str, str | None]] = [
    ("write_fsync", "limit: write+fsync", None),
    ("pagecache_read", "limit: page-cache read", None),
    ("cold_read", "limit: cold read", None),
    ("memcpy", "limit: memcpy", None),
    ("save_durable", "save, durable (fsync)", "write_fsync"),
    ("save", "save, not durable", "write_fsync"),
    ("load_hot", "load hot", "pagecache_read"),
    ("load_cold", "load cold", "cold_read"),
    ("mmap_hot", "mmap load hot, touched", "pagecache_read"),
    ("mmap_cold", "mmap load cold, touched", "cold_read"),
]
RAW_MEASURES = [m for m, _, limit in MEASURES if limit is None]
SYSTEM_MEASURES = [m for m, _, limit in MEASURES if limit is not None]
LIMIT_OF = {m: limit for m, _, limit in MEASURES}
LABEL = {m: label for m, label, _ in MEASURES}
# tensorfile's per-tensor Python work, timed on the small-tensor workload (milliseconds).
HEADER_MEASURES = {
    "header_save": "plan + header encode",
    "header_load": "header read + parse",
}
LABEL.update(HEADER_MEASURES)
LIMIT_OF.update(dict.fromkeys(HEADER_MEASURES))
# Measured again with 1..N threads (TENSORFILE_NUM_THREADS) on the main model workload.
THREAD_SWEEP_MEASURES = ("save_durable", "load_hot", "load_cold")

# What a system cannot do at all: shown as n/a with the reason, never as a figure.
UNSUPPORTED = {
    ("numpy", "mmap_hot"): "np.load maps only .npy files, not np.savez archives",
    ("numpy", "mmap_cold"): "np.load maps only .npy files, not np.savez archives",
    ("dcp", "mmap_hot"): "torch.distributed.checkpoint has no mmap load",
    ("dcp", "mmap_cold"): "torch.distributed.checkpoint has no mmap load",
    ("tensorizer", "mmap_hot"): "tensorizer has no mmap load",
    ("tensorizer", "mmap_cold"): "tensorizer has no mmap load",
}
_EXT = {
    "tensorfile": "tf",
    "torch": "pt",
    "safetensors": "safetensors",
    "numpy": "npz",
    "dcp": "dcp",
    "tensorizer": "tensors",
    "tf:torch.save": "x.pt",
    "tf:safetensors": "x.safetensors",
    RAW: "raw",
}

NOTES = [
    "GB/s = payload bytes (the tensors' bytes) / seconds; median of the reps; spread = (max - min) / median.",
    "vs limit: against the raw limit of the same run (saves: write+fsync; hot loads: page-cache read; cold loads: cold read).",
    "vs best peer: against the fastest peer (torch, safetensors, numpy, dcp, tensorizer) on the same measure; 1.00x marks that peer.",
    "limits: the best of 1..N threads of plain pwrite (into fallocated space, with and without early writeback by sync_file_range) + fsync, and pread into touched memory.",
    "cold: the files' pages dropped with posix_fadvise(DONTNEED) first; durable peers: fsync of file(s) and directory after the save.",
    "load: into fresh memory (safetensors: load_file(backend='pread'); dcp: dcp.load into torch.empty tensors allocated inside the timing); mmap load (safetensors: load_file()) reads a byte of every page.",
    "numpy: one np.savez archive (uncompressed) per state dict, np.load of every array; dcp: FileSystemWriter/Reader, thread_count = cores, one process, no process group.",
    "tf:torch.save / tf:safetensors: files written by torch.save / safetensors save_file (their save row is that library's non-durable save), loaded by tensorfile.load.",
    "RSS: each figure is measured in its own forked child; base = VmRSS after the imports (and, for saves, the built payload); peak = VmHWM during the measure.",
]


# --------------------------------------------------------------------------- machine


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(directory: str) -> dict[str, Any]:
    from .. import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _meminfo_gib(),
        "kernel": platform.release(),
        "bench_dir": os.path.abspath(directory),
        "filesystem": filesystem(directory),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
        "tensorizer": _version("tensorizer"),
        "matplotlib": _version("matplotlib"),
        "tensorfile": __version__,
        # Other work on the machine moves the figures; this says how busy it was.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    fs = m["filesystem"]
    mem = f"{m['memory_gib']:.1f} GiB RAM" if m["memory_gib"] else "RAM unknown"
    return (
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {mem}, Linux {m['kernel']}; "
        f"bench dir {m['bench_dir']} on {fs['type']} {fs['device']} ({fs['free_gib']:.0f} GiB free); "
        f"python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, "
        f"safetensors {m['safetensors']}, tensorizer {m.get('tensorizer', '?')}, tensorfile {m['tensorfile']}"
        + (f"; load average at start {m['loadavg'][0]:.2f}" if m.get("loadavg") else "")
    )


# --------------------------------------------------------------------------- planning


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULE[name]) is not None
    except (ImportError, ValueError):
        return False


def parse_size(text: str) -> float:
    """'64M', '1G', '1.5G' or a plain number of MiB -> MiB."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1 << 20}
    try:
        if t and t[-1] in scale:
            value = float(t[:-1]) * scale[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number of MiB or one like 64M, 1G") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"size {text!r}: must be positive")
    return value


def _size_name(mb: float) -> str:
    if mb >= 1024 and (mb / 1024).is_integer():
        return f"{mb / 1024:.0f}G"
    return f"{mb:g}M"


def workload_list(
    workloads: list[str], size_mb: float, small_count: int, sweep_sizes: list[float]
) -> list[dict[str, Any]]:
    """The main workloads, then the payload sweep: the fp32 model at each size."""
    out: list[dict[str, Any]] = []
    for w in workloads:
        out.append({"name": w, "base": w, "size_mb": size_mb, "sweep": False})
    for mb in sweep_sizes:
        if mb == size_mb and "transformer-fp32" in workloads:
            continue  # the main model workload is that point already
        out.append(
            {
                "name": f"transformer-fp32@{_size_name(mb)}",
                "base": "transformer-fp32",
                "size_mb": mb,
                "sweep": True,
            }
        )
    for entry in out:
        entry.update(describe(entry["base"], entry["size_mb"], small_count))
    # Tiny sizes round up to the smallest model: measure each payload once.
    seen: set[int] = set()
    kept = []
    for entry in out:
        key = entry["payload_bytes"] if entry["base"] == "transformer-fp32" else -1
        if key in seen and entry["sweep"]:
            continue
        seen.add(key)
        kept.append(entry)
    return kept


def _row_system(system: str, threads: int | None) -> str:
    if threads is None:
        return system
    return f"{system}[{threads} thread{'s' if threads != 1 else ''}]"


def _measures_of(
    system: str, workload: dict[str, Any], sweep_threads: list[int]
) -> tuple[list[tuple[str, int | None]], list[tuple[str, int | None]]]:
    """(save-phase, load-phase) measures of a system on a workload, with thread counts."""
    if system == RAW:
        return [("write_fsync", None)], [(m, None) for m in RAW_MEASURES if m != "write_fsync"]
    saves: list[tuple[str, int | None]] = [("save_durable", None), ("save", None)]
    if system in CROSS:
        saves = [("save", None)]  # only to write the file tensorfile then reads
    loads: list[tuple[str, int | None]] = [
        (m, None)
        for m in SYSTEM_MEASURES
        if m not in ("save_durable", "save") and (system, m) not in UNSUPPORTED
    ]
    if system == "tensorfile":
        if workload["base"] == "small-fp32":
            saves.append(("header_save", None))
            loads.append(("header_load", None))
        if workload["base"] == "transformer-fp32" and not workload["sweep"]:
            for n in sweep_threads:
                saves.append(("save_durable", n))
                loads += [(m, n) for m in THREAD_SWEEP_MEASURES if m != "save_durable"]
    return saves, loads


def plan_jobs(
    workloads: list[dict[str, Any]],
    systems: list[str],
    reps: int,
    *,
    workdir: str,
    small_count: int,
    cores: int,
    sweep_threads: list[int],
    timeout: float | None,
) -> list[dict[str, Any]]:
    """The children in the order they run. Every rep runs every workload; within a
    workload, first every system saves (the payload is built once, and the save
    children share it), then every system loads the file it saved. Within each phase
    the systems take turns, rotated each rep, so that drift on a noisy machine spreads
    over all of them. The last job of a workload removes its files."""
    jobs: list[dict[str, Any]] = []
    names = [RAW, *systems]
    for rep in range(reps):
        turn = names[rep % len(names) :] + names[: rep % len(names)]
        for w in workloads:
            phases: dict[str, list[dict[str, Any]]] = {"save": [], "load": []}
            paths = []
            for s in turn:
                path = os.path.join(workdir, f"{w['name']}.{_EXT[s]}")
                paths.append(path)
                for phase, group in zip(("save", "load"), _measures_of(s, w, sweep_threads)):
                    for m, n in group:
                        phases[phase].append(
                            {
                                "rep": rep,
                                "phase": phase,
                                "workload": w["name"],
                                "base_workload": w["base"],
                                "size_mb": w["size_mb"],
                                "small_count": small_count,
                                "system": s,
                                "row_system": _row_system(s, n),
                                "measure": m,
                                "label": f"{_row_system(s, n)} {LABEL[m]}",
                                "threads": n,
                                "cores": cores,
                                "nbytes": w["payload_bytes"],
                                "count": w["tensors"],
                                "path": path,
                                "timeout": timeout or 300 + 120 * w["payload_bytes"] / 1e9,
                                "cleanup": [],
                            }
                        )
            block = phases["save"] + phases["load"]
            if block:
                block[-1]["cleanup"] = paths
            jobs += block
    return jobs


# --------------------------------------------------------------------------- running


def _serve(
    jobs: list[dict[str, Any]],
    systems: list[str],
    cores: int,
    workdir: str,
    progress: Callable[[int, int, str], None] | None,
) -> list[dict[str, Any]]:
    """Runs the jobs in one fork server (`worker`) and returns one entry per job;
    a job the server never reported gets an error saying why."""
    jobs_path = os.path.join(workdir, "jobs.json")
    results_path = os.path.join(workdir, "results.jsonl")
    stderr_path = os.path.join(workdir, "server.stderr")
    # The worker's "workload" is the base workload that it builds.
    wire = [{**j, "workload": j["base_workload"]} for j in jobs]
    with open(jobs_path, "w") as f:
        json.dump({"jobs": wire, "systems": systems, "cores": cores}, f)
    with open(stderr_path, "w") as err:
        with subprocess.Popen(
            [sys.executable, "-m", "tensorfile.benchmarks.worker", jobs_path, results_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                parts = line.rstrip("\n").split("\t")
                if progress and len(parts) == 3 and parts[0].isdigit():
                    k = int(parts[0])
                    progress(k, len(jobs), f"{jobs[k - 1]['workload']} {parts[2]}")
    entries: dict[int, dict[str, Any]] = {}
    try:
        with open(results_path) as f:
            for line in f:
                rec = json.loads(line)
                entries[rec["job"]] = rec["entry"]
    except (OSError, ValueError):
        pass
    why = "not measured"
    if proc.returncode != 0:
        with open(stderr_path, errors="replace") as f:
            lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        why = f"benchmark server exited with status {proc.returncode}: {lines[-1] if lines else 'no message'}"
    return [entries.get(k, {"error": why}) for k in range(len(jobs))]


def run(
    *,
    size_mb: float = 1024,
    small_count: int = 20000,
    reps: int = 3,
    directory: str | None = None,
    systems: list[str] | None = None,
    workloads: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    timeout: float | None = None,
    sweep_sizes: list[float] | None = None,
    sweep_threads: list[int] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and returns everything it measured (see `summarize`).

    `sweep_sizes` (MiB) adds the fp32 model at each payload size; None means a sixteenth
    of `size_mb` (64 MiB by default: with the main size, two points per system while the
    default run stays near 20 minutes on 2 cores), [] none. `sweep_threads`
    reruns tensorfile's durable save and loads with each thread count; None means 1, 2,
    4, ... up to the core count."""
    systems = list(systems or SYSTEMS)
    wanted = list(workloads or WORKLOADS)
    for w in wanted:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; expected one of {', '.join(WORKLOADS)}")
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; expected one of {', '.join(SYSTEMS)}")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    cores = min(cores, 16)
    if sweep_sizes is None:
        sweep_sizes = [size_mb / 16] if "transformer-fp32" in wanted else []
    if sweep_threads is None:
        sweep_threads = thread_counts(cores)
    wl = workload_list(wanted, size_mb, small_count, sorted(set(sweep_sizes)))
    missing = [s for s in systems if not installed(s)]
    present = [s for s in systems if s not in missing]
    base = directory or os.path.join("bench", "out", "tmp")
    os.makedirs(base, exist_ok=True)
    workdir = os.path.abspath(tempfile.mkdtemp(prefix="tfbench-", dir=base))
    started = time.time()
    mach = machine(workdir)
    try:
        jobs = plan_jobs(
            wl,
            present,
            reps,
            workdir=workdir,
            small_count=small_count,
            cores=cores,
            sweep_threads=sweep_threads,
            timeout=timeout,
        )
        entries = _serve(jobs, present, cores, workdir, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for job, entry in zip(jobs, entries):
        entry = {**entry, "rep": job["rep"], "threads_requested": job["threads"]}
        samples.setdefault((job["workload"], job["row_system"], job["measure"]), []).append(entry)
    for one in wl:
        for s in missing:
            for m in SYSTEM_MEASURES:
                samples[(one["name"], s, m)] = [{"unavailable": "not installed"}]
        for s in present:
            for m in SYSTEM_MEASURES:
                if (s, m) in UNSUPPORTED:
                    samples[(one["name"], s, m)] = [{"unavailable": UNSUPPORTED[(s, m)]}]
    info = {one["name"]: {k: v for k, v in one.items() if k != "name"} for one in wl}
    return summarize(
        samples,
        info,
        mach,
        config={
            "size_mb": size_mb,
            "small_count": small_count,
            "reps": reps,
            "systems": systems,
            "not_installed": missing,
            "workloads": wanted,
            "sweep_sizes_mb": sorted(set(sweep_sizes)),
            "sweep_threads": sweep_threads,
            "threads": cores,
            "dir": os.path.abspath(base),
            "wall_s": time.time() - started,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    )


# --------------------------------------------------------------------------- figures


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _base_system(row_system: str) -> str:
    return row_system.split("[", 1)[0]


def summarize(
    samples: dict[tuple[str, str, str], list[dict[str, Any]]],
    info: dict[str, Any],
    mach: dict[str, Any],
    *,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Medians, GB/s, ratios and RSS from the raw samples; the JSON the bench writes."""
    rows: list[dict[str, Any]] = []
    for (w, s, m), entries in samples.items():
        secs = [e["seconds"] for e in entries if "seconds" in e and e["seconds"] > 0]
        errors = [e["error"] for e in entries if "error" in e]
        unavailable = next((e["unavailable"] for e in entries if "unavailable" in e), None)
        med = _median(secs)
        payload = info[w]["payload_bytes"]
        peaks = [e["rss_peak_mib"] for e in entries if e.get("rss_peak_mib") is not None]
        bases = [e["rss_base_mib"] for e in entries if e.get("rss_base_mib") is not None]
        over = [
            e["rss_peak_mib"] - e["rss_base_mib"]
            for e in entries
            if e.get("rss_peak_mib") is not None and e.get("rss_base_mib") is not None
        ]
        row: dict[str, Any] = {
            "workload": w,
            "system": s,
            "measure": m,
            "label": LABEL[m],
            "seconds": secs,
            "median_s": med,
            "gbps": payload / med / 1e9 if med and m not in HEADER_MEASURES else None,
            "spread": (max(secs) - min(secs)) / med if med and len(secs) > 1 else None,
            "rss_base_mib": _median(bases),
            "rss_peak_mib": _median(peaks),
            "rss_over_base_mib": _median(over),
            "errors": errors,
            "unavailable": unavailable,
            "failed": not secs and unavailable is None,
            "samples": entries,  # every rep's raw entry, tracebacks of failures included
        }
        extra = {
            k: [e.get(k) for e in entries]
            for k in (
                "threads",
                "by_threads",
                "by_threads_writeback",
                "writeback",
                "resident_after_evict",
                "samples",
                "first_s",
            )
            if any(k in e for e in entries)
        }
        if extra:
            row["details"] = extra
        rows.append(row)
    by = {(r["workload"], r["system"], r["measure"]): r for r in rows}
    for r in rows:
        limit = LIMIT_OF[r["measure"]]
        r["vs_limit"] = None
        r["vs_best_peer"] = None
        if r["gbps"] is None or limit is None:
            continue
        lim = by.get((r["workload"], RAW, limit))
        if lim and lim["gbps"]:
            r["vs_limit"] = r["gbps"] / lim["gbps"]
        peers = [
            o["gbps"]
            for o in rows
            if o["workload"] == r["workload"]
            and o["measure"] == r["measure"]
            and o["system"] in PEERS
            and o["gbps"]
        ]
        if peers:
            r["vs_best_peer"] = r["gbps"] / max(peers)
    order_m = {m: i for i, m in enumerate([*(m for m, _, _ in MEASURES), *HEADER_MEASURES])}
    order_s = {s: i for i, s in enumerate([RAW, *SYSTEMS])}
    order_w = {w: i for i, w in enumerate(info)}
    rows.sort(
        key=lambda r: (
            order_w[r["workload"]],
            r["system"] != _base_system(r["system"]),  # the thread sweep after the rest
            order_m[r["measure"]],
            order_s.get(_base_system(r["system"]), 99),
            r["system"],
        )
    )
    report = {
        "machine": mach,
        "config": config,
        "workloads": [{"name": w, **v} for w, v in info.items()],
        "results": rows,
        "notes": NOTES,
    }
    report["targets"] = targets(report)
    return report


# --------------------------------------------------------------------------- targets

MIB = 1 << 20


def _gbps(rows: dict[tuple[str, str, str], dict[str, Any]], w: str, s: str, m: str) -> float | None:
    r = rows.get((w, s, m))
    return r["gbps"] if r else None


# How a target's check compares its value with its bar.
COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, bar: value >= bar,
    "<=": lambda value, bar: value <= bar,
    "<": lambda value, bar: value < bar,
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _check(what: str, value: float | None, op: str, bar: float) -> dict[str, Any]:
    return {"what": what, "value": value, "op": op, "bar": bar}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the requirement on each workload it reads, with its checks (the
    value computed from the rows, the comparison and the bar), its figures as text, and
    met: True when every check holds, False when one fails, None when a value is not
    measured. `key` names the target across workloads and runs; `target` is its title.
    Targets read from the main workloads, not the sweeps. RSS targets are read as growth
    over the child's baseline (the interpreter with torch imported, and for saves the
    payload already built)."""
    rows = {(r["workload"], r["system"], r["measure"]): r for r in report["results"]}
    present = {w["name"] for w in report["workloads"]}
    payload = {w["name"]: w["payload_bytes"] for w in report["workloads"]}
    count = {w["name"]: w["tensors"] for w in report["workloads"]}
    out: list[dict[str, Any]] = []

    def add(
        key: str, target: str, workload: str, checks: list[dict[str, Any]], figures: str
    ) -> None:
        if any(c["value"] is None for c in checks):
            met = None
        else:
            met = all(COMPARE[c["op"]](c["value"], c["bar"]) for c in checks)
        out.append(
            {
                "key": key,
                "target": target,
                "workload": workload,
                "met": met,
                "checks": checks,
                "figures": figures,
            }
        )

    def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
        return "-" if x is None else f"{x:{spec}}{suffix}"

    model_loads = [
        w for w in ("transformer-fp32", "transformer-bf16", "checkpoint") if w in present
    ]
    if "transformer-fp32" in present:
        w = "transformer-fp32"
        tf = _gbps(rows, w, "tensorfile", "save_durable")
        lim = _gbps(rows, w, RAW, "write_fsync")
        peers = [
            x for x in (_gbps(rows, w, p, "save_durable") for p in ("torch", "safetensors")) if x
        ]
        best = max(peers) if peers else None
        vs_lim, vs_best = _ratio(tf, lim), _ratio(tf, best)
        add(
            "save_durable",
            "durable save >= 0.9x raw write+fsync and >= 1.3x best of torch.save/safetensors (+fsync)",
            w,
            [
                _check("vs raw write+fsync", vs_lim, ">=", 0.9),
                _check("vs best of torch.save/safetensors", vs_best, ">=", 1.3),
            ],
            f"tensorfile {fmt(tf)} GB/s, raw {fmt(lim)} GB/s ({fmt(vs_lim)}x), "
            f"best of torch/safetensors {fmt(best)} GB/s ({fmt(vs_best)}x)",
        )
    if "small-fp32" in present:
        w = "small-fp32"
        for m, what in (("save_durable", "durable save"), ("load_hot", "load")):
            tf, pt = _gbps(rows, w, "tensorfile", m), _gbps(rows, w, "torch", m)
            ratio = _ratio(tf, pt)
            add(
                f"small_{m}_vs_torch",
                f"{what}, {count[w]:,} small tensors >= 5x torch",
                w,
                [_check("vs torch", ratio, ">=", 5.0)],
                f"tensorfile {fmt(tf, '.3f')} GB/s, torch {fmt(pt, '.3f')} GB/s ({fmt(ratio)}x)",
            )
    for m, lim_m, bar in (("load_hot", "pagecache_read", 0.8), ("load_cold", "cold_read", 0.9)):
        for w in model_loads:
            tf, lim = _gbps(rows, w, "tensorfile", m), _gbps(rows, w, RAW, lim_m)
            ratio = _ratio(tf, lim)
            raw = LABEL[lim_m].split(": ")[1]
            add(
                f"{m}_vs_raw",
                f"{LABEL[m]} into fresh memory >= {bar}x raw {raw}",
                w,
                [_check(f"vs raw {raw}", ratio, ">=", bar)],
                f"tensorfile {fmt(tf)} GB/s, raw {fmt(lim)} GB/s ({fmt(ratio)}x)",
            )
    for m in ("mmap_hot", "mmap_cold"):
        for w in ("transformer-fp32", "transformer-bf16"):
            if w not in present:
                continue
            tf, st = _gbps(rows, w, "tensorfile", m), _gbps(rows, w, "safetensors", m)
            # "within 1.2x": tensorfile's time at most 1.2x safetensors' time
            ratio = _ratio(st, tf)
            add(
                f"{m}_vs_safetensors",
                f"{LABEL[m]}: time within 1.2x of safetensors load_file (touched)",
                w,
                [_check("time over safetensors' time", ratio, "<=", 1.2)],
                f"tensorfile {fmt(tf)} GB/s, safetensors {fmt(st)} GB/s (time ratio {fmt(ratio)}x)",
            )
    for w in sorted(present, key=list(payload).index):
        if w not in ("transformer-fp32", "transformer-bf16", "small-fp32", "checkpoint"):
            continue
        for key, measures, allow, target in (
            (
                "rss_load",
                ("load_hot", "load_cold", "mmap_hot", "mmap_cold"),
                payload[w] * 1.1 / MIB + 64,
                "peak RSS while loading <= payload x 1.1 + 64 MiB (over the baseline)",
            ),
            (
                "rss_save",
                ("save_durable", "save"),
                64.0,
                "peak RSS while saving <= baseline (payload built) + 64 MiB",
            ),
        ):
            worst = None
            detail = []
            for m in measures:
                r = rows.get((w, "tensorfile", m))
                if r and r["rss_over_base_mib"] is not None:
                    detail.append(f"{m} +{r['rss_over_base_mib']:.0f}")
                    worst = max(worst or 0.0, r["rss_over_base_mib"])
            add(
                key,
                target,
                w,
                [_check("MiB over the baseline, the worst measure", worst, "<=", allow)],
                f"allowed +{allow:.0f} MiB; " + (", ".join(detail) or "not measured") + " MiB",
            )
    for cross, peer, m, peer_m, bar, what in (
        ("tf:torch.save", "torch", "load_hot", "load_hot", 2.0, "torch.load"),
        (
            "tf:safetensors",
            "safetensors",
            "load_cold",
            "mmap_cold",
            1.5,
            "safetensors load_file (touched)",
        ),
    ):
        w = "transformer-fp32"
        if w not in present:
            continue
        tf, pe = _gbps(rows, w, cross, m), _gbps(rows, w, peer, peer_m)
        ratio = _ratio(tf, pe)
        add(
            f"{cross}_{m}",
            f"{cross} {LABEL[m]} >= {bar}x {what}{' cold' if 'cold' in m else ''}",
            w,
            [_check(f"vs {peer} {peer_m}", ratio, ">=", bar)],
            f"tensorfile {fmt(tf)} GB/s, {peer} {fmt(pe)} GB/s ({fmt(ratio)}x)",
        )
    if "small-fp32" in present:
        w = "small-fp32"
        for m in HEADER_MEASURES:
            r = rows.get((w, "tensorfile", m))
            ms = r["median_s"] * 1e3 if r and r["median_s"] else None
            add(
                m,
                f"{HEADER_MEASURES[m]}, {count[w]:,} tensors < 50 ms",
                w,
                [_check("milliseconds", ms, "<", 50.0)],
                f"{fmt(ms, '.1f')} ms",
            )
    return out


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(report: dict[str, Any]) -> str:
    """The report as fixed-width text: the machine line, one block per workload, the
    targets and the notes."""
    cfg = report["config"]
    lines = [machine_line(report["machine"]), ""]
    head = (
        f"{'measure':<25} {'system':<22} {'GB/s':>7} {'median s':>9} {'spread':>7} "
        f"{'vs limit':>9} {'vs best peer':>13} {'base MiB':>9} {'peak MiB':>9}"
    )
    for w in report["workloads"]:
        lines.append(
            f"== {w['name']}: {w['payload_bytes'] / (1 << 20):.1f} MiB payload in {w['tensors']} tensors ({w['dtype']}), "
            f"median of {cfg['reps']} rep{'s' if cfg['reps'] != 1 else ''}"
        )
        lines.append(head)
        for r in report["results"]:
            if r["workload"] != w["name"]:
                continue
            left = f"{r['label']:<25} {r['system']:<22}"
            if r["unavailable"]:
                lines.append(f"{left} n/a: {r['unavailable']}")
                continue
            if r["failed"]:
                msg = r["errors"][0] if r["errors"] else "failed"
                lines.append(f"{left} FAILED: {msg[:110]}")
                continue
            partial = (
                f"  ({len(r['errors'])} of {len(r['errors']) + len(r['seconds'])} reps failed: {r['errors'][0][:60]})"
                if r["errors"]
                else ""
            )
            spread = None if r["spread"] is None else r["spread"] * 100
            if r["measure"] in HEADER_MEASURES:
                speed = f"{r['median_s'] * 1e3:6.1f}ms"
            else:
                speed = _fmt(r["gbps"], "7.2f")
            lines.append(
                f"{left} {speed:>7} {_fmt(r['median_s'], '9.3f')} {_fmt(spread, '6.0f', '%'):>7}"
                f" {_fmt(r['vs_limit'], '8.2f', 'x'):>9} {_fmt(r['vs_best_peer'], '12.2f', 'x'):>13}"
                f" {_fmt(r['rss_base_mib'], '9.0f')} {_fmt(r['rss_peak_mib'], '9.0f')}{partial}"
            )
        lines.append("")
    lines.append("== targets (ratios from this one run)")
    for t in report.get("targets", []):
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        lines.append(f"{mark} {t['target']} [{t['workload']}]: {t['figures']}")
    lines.append("")
    lines += [f"note: {n}" for n in NOTES]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str, plot_path: str | None = "") -> str | None:
    """Writes the report as JSON and the throughput plot beside it (`path` with .png, or
    `plot_path`; None for no plot). Returns a line about the plot for the user."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    if plot_path is None:
        return None
    return plot(report, plot_path or os.path.splitext(path)[0] + ".png")


_PLOT_MEASURES = ("save_durable", "save", "load_hot", "load_cold", "mmap_hot", "mmap_cold")


def plot(report: dict[str, Any], path: str) -> str:
    """A PNG of GB/s against payload size for every system, one panel per measure, from
    the fp32 model workload and its payload sweep; the raw limit dashed. Needs matplotlib
    (the `bench` extra); without it, says so and writes nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'tensorfile[bench]')"
    sizes = {
        w["name"]: w["payload_bytes"]
        for w in report["workloads"]
        if w.get("base", w["name"]) == "transformer-fp32"
    }
    if not sizes:
        return "plot skipped: the transformer-fp32 workload was not run"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    systems = [RAW, *SYSTEMS]
    colors = {s: f"C{i}" for i, s in enumerate(systems)}
    for ax, m in zip(axes.flat, _PLOT_MEASURES):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in report["results"]:
            if (
                r["workload"] in sizes
                and r["system"] in SYSTEMS
                and r["measure"] == m
                and r["gbps"]
            ):
                series.setdefault(r["system"], []).append((sizes[r["workload"]], r["gbps"]))
            if (
                r["workload"] in sizes
                and r["system"] == RAW
                and r["measure"] == LIMIT_OF[m]
                and r["gbps"]
            ):
                series.setdefault(RAW, []).append((sizes[r["workload"]], r["gbps"]))
        for s in systems:
            pts = sorted(series.get(s, []))
            if not pts:
                continue
            label = f"raw limit ({LABEL[LIMIT_OF[m] or m].split(': ')[1]})" if s == RAW else s
            ax.plot(
                [p[0] / MIB for p in pts],
                [p[1] for p in pts],
                "--" if s == RAW else "-",
                marker="o",
                color=colors[s],
                label=label,
            )
        ax.set_title(LABEL[m])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("payload (MiB)")
    for ax in axes[:, 0]:
        ax.set_ylabel("GB/s (median)")
    mach = report["machine"]
    fig.suptitle(
        f"transformer-shaped fp32 state dict: throughput against payload size "
        f"({mach['cores']} cores, {mach['filesystem']['type']}, torch {mach['torch']}, "
        f"median of {report['config']['reps']})",
        fontsize=11,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------- command line


def _size_arg(text: str) -> float:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as the rest of the `tensorfile` command line reports them: "Error: ..."
    on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"Error: {message}\n")


def _names(p: _Parser, text: str | None, allowed: tuple[str, ...], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        p.error(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None, prog: str = "tensorfile bench") -> int:
    """The whole benchmark from the command line: runs it, prints the table and the
    targets, writes the JSON and the PNG. Returns the exit status. `dcp` as the first
    argument runs the 2-rank torch.distributed.checkpoint benchmark instead."""
    if argv and argv[0] == "dcp":
        from . import dcp

        return dcp.main(argv[1:], prog=f"{prog} dcp")
    p = _Parser(
        prog=prog,
        description="Measure tensorfile against the raw I/O limits of this machine and its peers "
        "(torch, safetensors, numpy, torch.distributed.checkpoint, tensorizer), every figure in its own child process. "
        f"'{prog} dcp --help': the 2-rank torch.distributed.checkpoint plugin benchmark.",
    )
    p.add_argument(
        "--size-mb",
        type=_size_arg,
        default=None,
        help="model workload size, e.g. 1024 or 1G [1G]; the checkpoint is half of it",
    )
    p.add_argument(
        "--small-count", type=int, default=None, help="tensors in the small-tensor workload [20000]"
    )
    p.add_argument(
        "--reps", type=int, default=None, help="repetitions per figure, the median is reported [3]"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run for smoke tests: 8 MiB, 500 small tensors, 1 rep unless given",
    )
    p.add_argument(
        "--dir",
        dest="directory",
        default=None,
        help="where the files go (a temporary directory is made inside and removed) [bench/out/tmp]",
    )
    p.add_argument(
        "--json",
        dest="json_path",
        default=os.path.join("bench", "out", "results.json"),
        help="where every figure and sample goes [bench/out/results.json]",
    )
    p.add_argument(
        "--plot",
        dest="plot_path",
        default="",
        help="the PNG of throughput against payload size [the --json path with .png]",
    )
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument(
        "--workloads",
        default=None,
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--sweep-sizes",
        default=None,
        help="payload sizes of the fp32 model sweep, e.g. 64M,256M,1G,4G; 'none' for no sweep "
        "[a sixteenth of --size-mb: 64M by default]",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="tensorfile thread counts to sweep, e.g. 1,2,4 ['none' for no sweep; default 1,2,4..cores]",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds allowed per measure [300 + 120 per GB]"
    )
    a = p.parse_args(argv)
    size_mb = a.size_mb if a.size_mb is not None else (8 if a.quick else 1024)
    small_count = a.small_count if a.small_count is not None else (500 if a.quick else 20000)
    reps = a.reps if a.reps is not None else (1 if a.quick else 3)
    if reps < 1 or small_count < 1:
        p.error("--reps and --small-count must be at least 1")
    if reps < 3 and not a.quick:
        print(
            f"warning: --reps {reps}: a median of fewer than 3 runs is not a reliable figure",
            file=sys.stderr,
        )
    sweep_sizes = None
    if a.sweep_sizes is not None:
        try:
            sweep_sizes = (
                []
                if a.sweep_sizes.strip().lower() in ("", "none")
                else [parse_size(x) for x in a.sweep_sizes.split(",") if x.strip()]
            )
        except ValueError as e:
            p.error(f"--sweep-sizes: {e}")
    sweep_threads = None
    if a.threads is not None:
        try:
            sweep_threads = (
                []
                if a.threads.strip().lower() in ("", "none")
                else [int(x) for x in a.threads.split(",") if x.strip()]
            )
        except ValueError:
            p.error(f"--threads {a.threads!r}: expected comma-separated integers")
        if any(n < 1 for n in sweep_threads):
            p.error("--threads: thread counts must be at least 1")
    if a.directory is not None and os.path.exists(a.directory) and not os.path.isdir(a.directory):
        p.error(f"--dir {a.directory}: not a directory")
    systems = _names(p, a.systems, SYSTEMS, "system")
    workloads = _names(p, a.workloads, WORKLOADS, "workload")

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="bench", leave=False, file=sys.stderr)

    def progress(done: int, total: int, what: str) -> None:
        if bar is not None:
            bar.total = total
            bar.set_postfix_str(what, refresh=False)
            bar.update(done - bar.n)
        else:
            print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    try:
        report = run(
            size_mb=size_mb,
            small_count=small_count,
            reps=reps,
            directory=a.directory,
            systems=systems,
            workloads=workloads,
            progress=progress,
            timeout=a.timeout,
            sweep_sizes=sweep_sizes,
            sweep_threads=sweep_threads,
        )
    finally:
        if bar is not None:
            bar.close()
    said = write_json(report, a.json_path, None if a.no_plot else a.plot_path)
    print(table(report))
    print(f"\nall figures and samples: {a.json_path}")
    if said:
        print(said)
    print(f"wall time: {report['config']['wall_s']:.0f} s")
    return 0
