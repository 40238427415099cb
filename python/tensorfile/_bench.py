"""The benchmark behind `tensorfile bench`: tensorfile against the machine's raw I/O limits, torch.save/torch.load and safetensors, each system in its own child process."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from . import _workloads

SYSTEMS = ("tensorfile", "torch", "safetensors")
RAW = "raw"

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

NOTES = [
    "GB/s = payload bytes (the tensors' bytes) / seconds; median of the reps; spread = (max - min) / median.",
    "vs limit: against the raw limit (saves: write+fsync; hot loads: page-cache read; cold loads: cold read).",
    "vs best other: against the fastest other system on the same measure (>1: faster than all of them).",
    "cold: the file's pages dropped with posix_fadvise(DONTNEED) first; durable peers: fsync of file and directory after the save.",
    "load: into fresh memory (safetensors: load_file(backend='pread')); mmap load (safetensors: load_file()) reads a byte of every page.",
    "peak RSS: the child's VmHWM during that measure (reset before it); it includes the interpreter and, for saves, the state dict.",
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


def _filesystem(path: str) -> dict[str, Any]:
    """The mount holding `path`: device, type and free space."""
    real = os.path.realpath(path)
    best = ("?", "?", "/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[2]
                ):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    st = os.statvfs(real)
    return {
        "device": best[0],
        "type": best[1],
        "mount": best[2],
        "free_gib": st.f_bavail * st.f_frsize / (1 << 30),
    }


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(directory: str) -> dict[str, Any]:
    from . import __version__

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
        "filesystem": _filesystem(directory),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
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
        f"safetensors {m['safetensors']}, tensorfile {m['tensorfile']}"
        + (f"; load average at start {m['loadavg'][0]:.2f}" if m.get("loadavg") else "")
    )


# --------------------------------------------------------------------------- children


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one worker; returns its measures, with an error for each it did not report."""
    expected = RAW_MEASURES if spec["system"] == RAW else SYSTEM_MEASURES
    try:
        os.unlink(spec["result"])
    except FileNotFoundError:
        pass
    failure = None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tensorfile._bench_worker", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            failure = f"child exited with status {proc.returncode}: {lines[-1] if lines else 'no message'}"
    except subprocess.TimeoutExpired:
        failure = f"child timed out after {timeout:.0f} s"
    try:
        with open(spec["result"]) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"measures": {}}
    for m in expected:
        entry = data["measures"].setdefault(m, {})
        if "seconds" not in entry and "error" not in entry:
            entry["error"] = failure or "not measured"
    if failure:
        data["failure"] = failure
    try:
        os.unlink(spec["path"])
    except OSError:
        pass
    return data


def _plan(systems: list[str], workloads: list[str], reps: int) -> list[tuple[int, str, str]]:
    """The order of the children: every rep runs every workload, and within a workload the
    systems take turns (rotated each rep) so that drift on a noisy machine spreads over all."""
    order = []
    names = [RAW, *systems]
    for rep in range(reps):
        turn = names[rep % len(names) :] + names[: rep % len(names)]
        for w in workloads:
            for s in turn:
                order.append((rep, w, s))
    return order


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
) -> dict[str, Any]:
    """Runs the benchmark and returns everything it measured (see `summarize`)."""
    systems = list(systems or SYSTEMS)
    workloads = list(workloads or _workloads.WORKLOADS)
    base = directory or os.path.join("bench", "out", "tmp")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tfbench-", dir=base)
    info: dict[str, Any] = {}
    for w in workloads:
        shapes, dtype = _workloads.shapes_for(w, size_mb, small_count)
        info[w] = {
            "dtype": dtype,
            "tensors": len(shapes),
            "payload_bytes": _workloads.payload_nbytes(shapes, dtype),
        }
    threads = min(os.cpu_count() or 1, 16)
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    children: list[dict[str, Any]] = []
    plan = _plan(systems, workloads, reps)
    started = time.time()
    mach = machine(workdir)
    try:
        for k, (rep, w, s) in enumerate(plan):
            ext = {"tensorfile": "tf", "torch": "pt", "safetensors": "safetensors", RAW: "raw"}[s]
            nbytes = info[w]["payload_bytes"]
            spec = {
                "system": s,
                "workload": w,
                "size_mb": size_mb,
                "small_count": small_count,
                "nbytes": nbytes,
                "count": info[w]["tensors"],
                "threads": threads,
                "seed": 0,
                "path": os.path.join(os.path.abspath(workdir), f"{w}.{ext}"),
                "result": os.path.join(os.path.abspath(workdir), f"{w}.{s}.json"),
            }
            limit = timeout or 300 + 120 * nbytes / 1e9
            t0 = time.perf_counter()
            data = _run_child(spec, limit)
            children.append(
                {"rep": rep, "workload": w, "system": s, "wall_s": time.perf_counter() - t0, **data}
            )
            for m, entry in data["measures"].items():
                samples.setdefault((w, s, m), []).append(entry)
            if progress:
                progress(
                    k + 1,
                    len(plan),
                    f"rep {rep + 1}/{reps} {w} {s}: {time.perf_counter() - t0:.1f} s",
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summarize(
        samples,
        info,
        mach,
        config={
            "size_mb": size_mb,
            "small_count": small_count,
            "reps": reps,
            "systems": systems,
            "workloads": workloads,
            "threads": threads,
            "dir": os.path.abspath(base),
            "wall_s": time.time() - started,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        children=children,
    )


# --------------------------------------------------------------------------- figures


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(
    samples: dict[tuple[str, str, str], list[dict[str, Any]]],
    info: dict[str, Any],
    mach: dict[str, Any],
    *,
    config: dict[str, Any],
    children: list[dict[str, Any]],
) -> dict[str, Any]:
    """Medians, GB/s and ratios from the raw samples; the JSON the bench writes."""
    rows: list[dict[str, Any]] = []
    for (w, s, m), entries in samples.items():
        secs = [e["seconds"] for e in entries if "seconds" in e and e["seconds"] > 0]
        errors = [e["error"] for e in entries if "error" in e]
        med = _median(secs)
        payload = info[w]["payload_bytes"]
        peaks = [e["rss_peak_mib"] for e in entries if e.get("rss_peak_mib") is not None]
        row: dict[str, Any] = {
            "workload": w,
            "system": s,
            "measure": m,
            "label": LABEL[m],
            "seconds": secs,
            "median_s": med,
            "gbps": payload / med / 1e9 if med else None,
            "spread": (max(secs) - min(secs)) / med if med and len(secs) > 1 else None,
            "rss_peak_mib": _median(peaks),
            "errors": errors,
            "failed": not secs,
        }
        extra = {
            k: [e.get(k) for e in entries]
            for k in ("threads", "resident_after_evict")
            if any(k in e for e in entries)
        }
        if extra:
            row["details"] = extra
        rows.append(row)
    by = {(r["workload"], r["system"], r["measure"]): r for r in rows}
    for r in rows:
        limit = LIMIT_OF[r["measure"]]
        r["vs_limit"] = None
        r["vs_best_other"] = None
        if r["gbps"] is None or limit is None:
            continue
        lim = by.get((r["workload"], RAW, limit))
        if lim and lim["gbps"]:
            r["vs_limit"] = r["gbps"] / lim["gbps"]
        others = [
            o["gbps"]
            for o in rows
            if o["workload"] == r["workload"]
            and o["measure"] == r["measure"]
            and o["system"] not in (RAW, r["system"])
            and o["gbps"]
        ]
        if others:
            r["vs_best_other"] = r["gbps"] / max(others)
    order_m = {m: i for i, (m, _, _) in enumerate(MEASURES)}
    order_s = {s: i for i, s in enumerate([RAW, *SYSTEMS])}
    order_w = {w: i for i, w in enumerate(info)}
    rows.sort(
        key=lambda r: (order_w[r["workload"]], order_m[r["measure"]], order_s.get(r["system"], 99))
    )
    whole: dict[str, dict[str, list[float]]] = {}
    for c in children:
        if c.get("child_peak_mib") is not None:
            whole.setdefault(c["workload"], {}).setdefault(c["system"], []).append(
                c["child_peak_mib"]
            )
    return {
        "machine": mach,
        "config": config,
        "workloads": [{"name": w, **v} for w, v in info.items()],
        "results": rows,
        # The whole child's VmHWM: the state dict, the saves and the loads together.
        "child_peak_rss_mib": {
            w: {s: statistics.median(v) for s, v in d.items()} for w, d in whole.items()
        },
        "notes": NOTES,
        "children": children,
    }


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(report: dict[str, Any]) -> str:
    """The report as fixed-width text: the machine line, then one block per workload."""
    cfg = report["config"]
    lines = [machine_line(report["machine"]), ""]
    head = f"{'measure':<25} {'system':<12} {'GB/s':>7} {'median s':>9} {'spread':>7} {'vs limit':>9} {'vs best other':>14} {'peak RSS MiB':>13}"
    for w in report["workloads"]:
        lines.append(
            f"== {w['name']}: {w['payload_bytes'] / (1 << 20):.1f} MiB payload in {w['tensors']} tensors ({w['dtype']}), "
            f"median of {cfg['reps']} rep{'s' if cfg['reps'] != 1 else ''}"
        )
        lines.append(head)
        for r in report["results"]:
            if r["workload"] != w["name"]:
                continue
            left = f"{r['label']:<25} {r['system']:<12}"
            if r["failed"]:
                msg = r["errors"][0] if r["errors"] else "failed"
                lines.append(f"{left} FAILED: {msg[:100]}")
                continue
            partial = (
                f"  ({len(r['errors'])} of {len(r['errors']) + len(r['seconds'])} reps failed)"
                if r["errors"]
                else ""
            )
            lines.append(
                f"{left} {_fmt(r['gbps'], '7.2f')} {_fmt(r['median_s'], '9.3f')} {_fmt(None if r['spread'] is None else r['spread'] * 100, '6.0f', '%'):>7}"
                f" {_fmt(r['vs_limit'], '8.2f', 'x'):>9} {_fmt(r['vs_best_other'], '13.2f', 'x'):>14} {_fmt(r['rss_peak_mib'], '13.0f')}{partial}"
            )
        whole = report.get("child_peak_rss_mib", {}).get(w["name"], {})
        if whole:
            lines.append(
                "peak RSS of the whole child, MiB: "
                + ", ".join(f"{s} {v:.0f}" for s, v in whole.items())
            )
        lines.append("")
    lines += [f"note: {n}" for n in NOTES]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
