"""The benchmark at a tiny size: it runs end to end, every figure comes from its own child,
its JSON, table, targets and plot hold every system, and a failing or missing peer is
reported rather than dropped."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from tensorfile.benchmarks import harness, workloads

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _rows(report: dict) -> dict:
    return {(r["workload"], r["system"], r["measure"]): r for r in report["results"]}


def _check_figure(report: dict, r: dict) -> None:
    """A measured row: the seconds its children reported, their median, the payload's GB/s
    at that median, its ratio to the raw limit of the same workload, and an RSS peak at or
    above the baseline that the same child recorded."""
    assert r["seconds"] and all(s > 0 for s in r["seconds"]), r
    assert r["seconds"] == [e["seconds"] for e in r["samples"] if "seconds" in e]
    assert r["median_s"] == statistics.median(r["seconds"])
    payload = next(w["payload_bytes"] for w in report["workloads"] if w["name"] == r["workload"])
    assert r["gbps"] == pytest.approx(payload / r["median_s"] / 1e9, rel=1e-12), r
    limit = harness.LIMIT_OF[r["measure"]]
    if limit is not None:
        lim = _rows(report)[(r["workload"], "raw", limit)]
        assert r["vs_limit"] == pytest.approx(r["gbps"] / lim["gbps"], rel=1e-12), r
    assert r["rss_base_mib"] > 0 and r["rss_peak_mib"] >= r["rss_base_mib"] - 1, r


@pytest.mark.slow
def test_bench_tiny_run_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    p = subprocess.run(
        [
            sys.executable, "-m", "tensorfile", "bench",
            "--size-mb", "4", "--small-count", "200", "--reps", "1",
            "--workloads", "transformer-fp32,small-fp32,checkpoint",
            "--dir", str(work), "--json", str(out),
        ],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "machine:" in p.stdout and "save, durable (fsync)" in p.stdout
    assert "== targets" in p.stdout
    assert os.listdir(work) == []  # the files and the per-run directory are gone
    assert (tmp_path / "results.png").exists() == HAVE_MPL

    report = json.loads(out.read_text())
    m = report["machine"]
    for key in ("cores", "memory_gib", "filesystem", "python", "torch", "numpy", "tensorfile"):
        assert m[key], key
    names = [w["name"] for w in report["workloads"]]
    # the main workloads, then the payload sweep (by default a sixteenth of the size)
    assert names == [
        "transformer-fp32",
        "small-fp32",
        "checkpoint",
        "transformer-fp32@0.25M",
    ]
    wl = {w["name"]: w for w in report["workloads"]}
    assert wl["small-fp32"]["tensors"] == 200
    # model, exp_avg, exp_avg_sq and step per parameter, and the rng state
    assert (wl["checkpoint"]["tensors"] - 1) % 4 == 0

    rows = _rows(report)
    for w in names:
        for s in ["raw", *harness.SYSTEMS]:
            measures = harness.RAW_MEASURES if s == "raw" else harness.SYSTEM_MEASURES
            if s in harness.CROSS:  # the peer's file, made by its plain save, read by tensorfile
                measures = [m for m in measures if m != "save_durable"]
            for meas in measures:
                r = rows[(w, s, meas)]
                if s in ("raw", "tensorfile"):
                    assert not r["failed"] and not r["errors"], r
                if r["unavailable"]:  # not installed, or a measure it has no way to do
                    assert r["gbps"] is None and not r["failed"]
                    continue
                if r["failed"]:  # a peer may fail, but then it says why
                    assert r["errors"] and r["gbps"] is None
                    continue
                _check_figure(report, r)
                if s != "raw":
                    if s in harness.PEERS:
                        assert 0 < r["vs_best_peer"] <= 1, r
    # The peers that take only flat dicts of tensors fail on the checkpoint, with their error.
    if harness.installed("safetensors"):
        st = rows[("checkpoint", "safetensors", "save_durable")]
        assert st["failed"] and "model" in st["errors"][0]
        assert (
            "every save of this system failed"
            in rows[("checkpoint", "safetensors", "load_hot")]["errors"][0]
        )
    assert not rows[("checkpoint", "torch", "load_hot")]["failed"]
    # tensorfile reads the files torch.save and safetensors wrote
    for cross in harness.CROSS:
        for meas in ("load_hot", "load_cold", "mmap_hot"):
            r = rows[("transformer-fp32", cross, meas)]
            assert not r["failed"] and r["gbps"] > 0, r
    # tensorfile's thread sweep and its per-tensor costs
    for n in report["config"]["sweep_threads"]:
        sys_n = f"tensorfile[{n} thread{'s' if n != 1 else ''}]"
        for meas in harness.THREAD_SWEEP_MEASURES:
            _check_figure(report, rows[("transformer-fp32", sys_n, meas)])
    for meas in harness.HEADER_MEASURES:
        # a time per call, not a throughput: the median of the child's 7 timed calls,
        # after the untimed first one
        r = rows[("small-fp32", "tensorfile", meas)]
        calls = r["details"]["samples"][0]
        assert r["gbps"] is None and len(calls) == 7
        assert r["seconds"] == [statistics.median(calls)] and r["median_s"] == r["seconds"][0]
        assert r["details"]["first_s"][0] > 0
    _check_targets(report)


def _check_targets(report: dict) -> None:
    """Every target of the run: its verdict follows from its checks, and each check's value
    is the one computed from the report's own rows."""
    rows = _rows(report)
    ts = {(t["key"], t["workload"]): t for t in report["targets"]}
    assert len(ts) == len(report["targets"])  # one of each target per workload
    # the main workloads have targets, the payload sweep has none
    assert {t["workload"] for t in report["targets"]} == set(report["config"]["workloads"])
    for t in report["targets"]:
        checks = t["checks"]
        assert checks and all(c["value"] is not None for c in checks), t  # all measured here
        assert t["met"] == all(harness.COMPARE[c["op"]](c["value"], c["bar"]) for c in checks)

    def value(key: str, w: str, i: int = 0) -> float:
        return ts[(key, w)]["checks"][i]["value"]

    def gbps(w: str, s: str, m: str) -> float:
        return rows[(w, s, m)]["gbps"]

    w = "transformer-fp32"
    tf = gbps(w, "tensorfile", "save_durable")
    assert value("save_durable", w, 0) == tf / gbps(w, "raw", "write_fsync")
    best = max(gbps(w, p, "save_durable") or 0 for p in ("torch", "safetensors"))
    assert value("save_durable", w, 1) == tf / best
    for m in ("mmap_hot", "mmap_cold"):  # safetensors' time over tensorfile's
        assert value(f"{m}_vs_safetensors", w) == gbps(w, "safetensors", m) / gbps(
            w, "tensorfile", m
        )
    assert value("tf:torch.save_load_hot", w) == gbps(w, "tf:torch.save", "load_hot") / gbps(
        w, "torch", "load_hot"
    )
    for w in ("transformer-fp32", "checkpoint"):
        for m, lim in (("load_hot", "pagecache_read"), ("load_cold", "cold_read")):
            assert value(f"{m}_vs_raw", w) == gbps(w, "tensorfile", m) / gbps(w, "raw", lim)
    w = "small-fp32"
    for m in ("save_durable", "load_hot"):
        assert value(f"small_{m}_vs_torch", w) == gbps(w, "tensorfile", m) / gbps(w, "torch", m)
    for m in harness.HEADER_MEASURES:
        assert value(m, w) == rows[(w, "tensorfile", m)]["median_s"] * 1e3
    payload = next(x["payload_bytes"] for x in report["workloads"] if x["name"] == w)
    loads = ("load_hot", "load_cold", "mmap_hot", "mmap_cold")
    rss = ts[("rss_load", w)]["checks"][0]
    assert rss["value"] == max(rows[(w, "tensorfile", m)]["rss_over_base_mib"] for m in loads)
    assert rss["bar"] == payload * 1.1 / (1 << 20) + 64


def test_bench_main_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    png = tmp_path / "plot.png"
    code = harness.main(
        [
            "--size-mb", "2", "--reps", "1", "--systems", "tensorfile,torch,tensorizer",
            "--workloads", "transformer-fp32", "--sweep-sizes", "1M", "--threads", "1",
            "--dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(png),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "== transformer-fp32: " in text and "== transformer-fp32@1M: " in text
    assert "== targets" in text
    if HAVE_MPL:
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {png}" in text
    else:
        assert not png.exists()
        assert "plot skipped: matplotlib is not installed" in text
    report = json.loads(out.read_text())
    rows = _rows(report)
    for w in ("transformer-fp32", "transformer-fp32@1M"):
        for meas in harness.SYSTEM_MEASURES:
            _check_figure(report, rows[(w, "tensorfile", meas)])
            _check_figure(report, rows[(w, "torch", meas)])
        z = rows[(w, "tensorizer", "load_hot")]
        if harness.installed("tensorizer"):
            assert z["failed"] or z["gbps"] > 0
        else:
            assert z["unavailable"] == "not installed" and "not installed" in text
        assert rows[(w, "tensorizer", "mmap_hot")]["unavailable"]
    _check_figure(report, rows[("transformer-fp32", "tensorfile[1 thread]", "save_durable")])
    # every figure came from its own child: the save children hold the payload in their
    # baseline, the load children do not
    save = rows[("transformer-fp32", "tensorfile", "save_durable")]
    load = rows[("transformer-fp32", "tensorfile", "load_hot")]
    assert save["rss_base_mib"] > load["rss_base_mib"]


def test_failing_peer_is_reported_not_dropped(tmp_path: Path) -> None:
    # numpy has no bfloat16: its saves fail with numpy's own error, its loads say why they
    # were not run, its mmap loads are n/a; tensorfile's figures stand.
    report = harness.run(
        size_mb=1,
        reps=1,
        systems=["tensorfile", "numpy"],
        workloads=["transformer-bf16"],
        directory=str(tmp_path),
        sweep_sizes=[],
        sweep_threads=[],
    )
    rows = _rows(report)
    w = "transformer-bf16"
    for meas in ("save_durable", "save"):
        r = rows[(w, "numpy", meas)]
        assert r["failed"] and "BFloat16" in r["errors"][0], r
        assert "Traceback" in r["samples"][0]["traceback"]
    for meas in ("load_hot", "load_cold"):
        assert "every save of this system failed" in rows[(w, "numpy", meas)]["errors"][0]
    assert "np.savez" in rows[(w, "numpy", "mmap_hot")]["unavailable"]
    for meas in harness.SYSTEM_MEASURES:
        _check_figure(report, rows[(w, "tensorfile", meas)])
    text = harness.table(report)
    assert "FAILED: TypeError: Got unsupported ScalarType BFloat16" in text
    assert "n/a: np.load maps only .npy files" in text


def test_a_measure_past_its_timeout_is_reported(tmp_path: Path) -> None:
    # 64 MiB written and fsynced cannot finish within the 1 ms allowed (the children are
    # killed at the first poll after it, about 5 ms)
    report = harness.run(
        size_mb=64,
        reps=1,
        systems=["tensorfile"],
        workloads=["transformer-fp32"],
        directory=str(tmp_path),
        sweep_sizes=[],
        sweep_threads=[],
        timeout=1e-3,
    )
    rows = _rows(report)
    assert "timed out" in rows[("transformer-fp32", "raw", "write_fsync")]["errors"][0]
    assert "timed out" in rows[("transformer-fp32", "tensorfile", "save_durable")]["errors"][0]
    assert all(r["failed"] for r in report["results"])
    assert os.listdir(tmp_path) == []


def test_table_shows_a_failed_peer_and_ratios() -> None:
    info = {"w": {"dtype": "float32", "tensors": 1, "payload_bytes": 10**9}}
    samples = {
        ("w", "raw", "write_fsync"): [{"seconds": 1.0}],
        ("w", "tensorfile", "save_durable"): [
            {"seconds": 1.25, "rss_base_mib": 90.0, "rss_peak_mib": 100.0}
        ],
        ("w", "torch", "save_durable"): [
            {"seconds": 2.5, "rss_base_mib": 90.0, "rss_peak_mib": 120.0}
        ],
        ("w", "numpy", "save_durable"): [{"seconds": 5.0}],
        ("w", "safetensors", "save_durable"): [{"error": "ValueError: shared tensors"}],
        ("w", "tensorizer", "save_durable"): [{"unavailable": "not installed"}],
    }
    mach = harness.machine(".")
    report = harness.summarize(samples, info, mach, config={"reps": 1})
    rows = {r["system"]: r for r in report["results"]}
    assert rows["tensorfile"]["gbps"] == pytest.approx(0.8)
    assert rows["tensorfile"]["vs_limit"] == pytest.approx(0.8)
    assert rows["tensorfile"]["vs_best_peer"] == pytest.approx(2.0)
    assert rows["tensorfile"]["rss_over_base_mib"] == pytest.approx(10.0)
    assert rows["torch"]["vs_best_peer"] == pytest.approx(1.0)
    assert rows["numpy"]["vs_best_peer"] == pytest.approx(0.5)
    assert rows["safetensors"]["failed"] and rows["safetensors"]["gbps"] is None
    assert rows["tensorizer"]["unavailable"] and not rows["tensorizer"]["failed"]
    text = harness.table(report)
    assert "FAILED: ValueError: shared tensors" in text
    assert "n/a: not installed" in text
    json.dumps(report)  # everything in it is JSON


def _report_with(figures: dict[tuple[str, str, str], float], payload: int = 1 << 30) -> dict:
    info = {
        w: {"dtype": "float32", "tensors": 20000, "payload_bytes": payload} for w, _, _ in figures
    }
    samples = {k: [{"seconds": payload / (v * 1e9)}] for k, v in figures.items()}
    return harness.summarize(samples, info, harness.machine("."), config={"reps": 1})


def _target(report: dict, key: str) -> dict:
    (t,) = [t for t in report["targets"] if t["key"] == key]
    return t


def test_targets_met_and_missed() -> None:
    w = "transformer-fp32"

    def save_target(tf: float) -> dict:
        report = _report_with(
            {
                (w, "raw", "write_fsync"): 1.0,
                (w, "tensorfile", "save_durable"): tf,
                (w, "torch", "save_durable"): 0.5,
                (w, "safetensors", "save_durable"): 0.7,
            }
        )
        return _target(report, "save_durable")

    t = save_target(0.92)
    assert t["met"] is True and t["workload"] == w
    assert [(c["value"], c["op"], c["bar"]) for c in t["checks"]] == [
        (pytest.approx(0.92), ">=", 0.9),  # over the raw limit
        (pytest.approx(0.92 / 0.7), ">=", 1.3),  # over the best peer, safetensors
    ]
    assert save_target(0.95)["met"] is True
    assert save_target(0.85)["met"] is False  # under 0.9 of the limit
    assert save_target(0.9)["met"] is False  # 0.9 / 0.7 < 1.3 of the best peer

    mm = _report_with(
        {
            (w, "tensorfile", "mmap_hot"): 1.0,
            (w, "safetensors", "mmap_hot"): 1.25,  # tensorfile takes 1.25x its time
            (w, "tensorfile", "mmap_cold"): 1.0,
            (w, "safetensors", "mmap_cold"): 1.1,
        }
    )
    got = {t["key"]: t["met"] for t in mm["targets"] if t["key"].startswith("mmap")}
    assert got == {"mmap_hot_vs_safetensors": False, "mmap_cold_vs_safetensors": True}
    assert _target(mm, "mmap_hot_vs_safetensors")["checks"][0]["value"] == pytest.approx(1.25)

    # no figure, no verdict
    none = _target(_report_with({(w, "raw", "write_fsync"): 1.0}), "save_durable")
    assert none["met"] is None and [c["value"] for c in none["checks"]] == [None, None]


def test_rss_targets_read_growth_over_the_baseline() -> None:
    w = "small-fp32"
    payload = 100 << 20
    info = {w: {"dtype": "float32", "tensors": 20000, "payload_bytes": payload}}
    entry = {"seconds": 0.1, "rss_base_mib": 300.0}
    samples = {
        (w, "tensorfile", "load_hot"): [{**entry, "rss_peak_mib": 300.0 + 110 + 64}],
        (w, "tensorfile", "load_cold"): [{**entry, "rss_peak_mib": 300.0 + 100}],
        (w, "tensorfile", "save_durable"): [{**entry, "rss_peak_mib": 300.0 + 65}],
    }
    report = harness.summarize(samples, info, harness.machine("."), config={"reps": 1})
    got = {t["key"]: t["met"] for t in report["targets"] if t["key"].startswith("rss")}
    assert got == {"rss_load": True, "rss_save": False}
    load, save = _target(report, "rss_load")["checks"][0], _target(report, "rss_save")["checks"][0]
    assert (load["value"], load["bar"]) == (110 + 64, 100 * 1.1 + 64)  # the worst load
    assert (save["value"], save["bar"]) == (65, 64)


def test_plan_interleaves_and_rotates_systems(tmp_path: Path) -> None:
    wl = harness.workload_list(["transformer-fp32", "small-fp32"], 2, 50, [1])
    assert [w["name"] for w in wl] == ["transformer-fp32", "small-fp32", "transformer-fp32@1M"]
    jobs = harness.plan_jobs(
        wl,
        ["tensorfile", "numpy"],
        2,
        workdir=str(tmp_path),
        small_count=50,
        cores=2,
        sweep_threads=[1, 2],
        timeout=None,
    )

    def block(rep: int, w: str) -> list[dict]:
        return [j for j in jobs if j["rep"] == rep and j["workload"] == w]

    # within a workload every system saves, then every system loads; rotated each rep
    for rep, first in ((0, "raw"), (1, "tensorfile")):
        b = block(rep, "small-fp32")
        phases = [j["phase"] for j in b]
        assert phases == sorted(phases, key=["save", "load"].index), phases
        assert b[0]["system"] == first
        saves = [j["system"] for j in b if j["phase"] == "save"]
        loads = [j["system"] for j in b if j["phase"] == "load"]
        assert list(dict.fromkeys(saves)) == list(dict.fromkeys(loads))
        # the last job removes every file of the block, and only it removes any
        assert sorted(b[-1]["cleanup"]) == sorted({j["path"] for j in b})
        assert not any(j["cleanup"] for j in b[:-1])
    # numpy has no mmap load; tensorfile's thread sweep is on the main model workload only,
    # its header timings on the small tensors
    assert not any(j["system"] == "numpy" and j["measure"].startswith("mmap") for j in jobs)
    sweep = [j for j in jobs if j["threads"] is not None]
    assert {j["workload"] for j in sweep} == {"transformer-fp32"}
    assert {j["row_system"] for j in sweep} == {"tensorfile[1 thread]", "tensorfile[2 threads]"}
    assert {j["measure"] for j in sweep} == set(harness.THREAD_SWEEP_MEASURES)
    headers = {j["workload"] for j in jobs if j["measure"] in harness.HEADER_MEASURES}
    assert headers == {"small-fp32"}


def test_checkpoint_workload_is_a_training_checkpoint() -> None:
    # about 500 MB at the default size: the model and its two Adam moments
    full = workloads.describe("checkpoint", 1024, 20000)
    assert full["payload_bytes"] == pytest.approx(512 << 20, rel=0.05)
    ck = workloads.build_workload("checkpoint", 8, 10)
    model, opt = ck["model"], ck["optimizer"]
    assert set(ck) == {"model", "optimizer", "epoch", "step", "rng_state"}
    assert len(opt["state"]) == len(model) == len(opt["param_groups"][0]["params"])
    for i, (name, w) in enumerate(model.items()):
        st = opt["state"][i]
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == w.shape, name
        assert st["step"].dim() == 0
        assert bool((st["exp_avg_sq"] >= 0).all())
    ts = workloads.tensors_in(ck)
    d = workloads.describe("checkpoint", 8, 10)
    assert len(ts) == d["tensors"]
    assert sum(t.numel() * t.element_size() for t in ts) == d["payload_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fork_safe_workloads_hold_plain_tensors_like_a_state_dict(dtype) -> None:
    """The server's payload is built without torch kernels, yet its tensors must be what
    a model's state dict holds: torch's own allocations, not views of numpy arrays (a
    view is slower for every system to read metadata from)."""
    import torch

    shapes = workloads.small_shapes(30) + workloads.transformer_shapes(1 << 20)
    built = workloads.build(shapes, dtype, fork_safe=True)
    assert [(k, tuple(t.shape)) for k, t in built.items()] == shapes
    for t in built.values():
        assert t.dtype == getattr(torch, dtype) and not t._is_view() and t._base is None
        assert t.is_contiguous() and bool(t.isfinite().all()) and bool((t != 0).any())


def test_sweep_sizes_that_round_to_one_model_are_measured_once() -> None:
    wl = harness.workload_list(["transformer-fp32"], 4, 200, [0.25, 1, 4])
    # 0.25 and 1 MiB both round up to the smallest model; 4 MiB is the main workload
    assert [w["name"] for w in wl] == ["transformer-fp32", "transformer-fp32@0.25M"]
    full = harness.workload_list(["transformer-fp32"], 1024, 1, [64, 256])
    assert [w["name"] for w in full] == [
        "transformer-fp32",
        "transformer-fp32@64M",
        "transformer-fp32@256M",
    ]
    for w, mib in zip(full, (1024, 64, 256)):
        assert w["payload_bytes"] == pytest.approx(mib << 20, rel=0.1), w


def test_sizes_and_thread_counts() -> None:
    assert harness.parse_size("64M") == 64
    assert harness.parse_size("4G") == 4096
    assert harness.parse_size("1.5GiB") == 1536
    assert harness.parse_size("512") == 512
    for bad in ("", "x", "-1M", "0"):
        with pytest.raises(ValueError, match="size"):
            harness.parse_size(bad)
    assert harness.thread_counts(1) == [1]
    assert harness.thread_counts(2) == [1, 2]
    assert harness.thread_counts(6) == [1, 2, 4, 6]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--systems", "nosuch"], "unknown system nosuch"),
        (["--workloads", "tiny"], "unknown workload tiny"),
        (["--reps", "0"], "--reps and --small-count must be at least 1"),
        (["--sweep-sizes", "64X"], "--sweep-sizes: size '64X'"),
        (["--threads", "0"], "--threads: thread counts must be at least 1"),
        (["--size-mb", "-4"], "must be positive"),
    ],
)
def test_usage_errors_exit_2_before_running(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        harness.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"Error: {message}" in err or (message in err and "Error:" in err), err


def test_the_benchmarks_load_only_when_a_benchmark_runs() -> None:
    code = (
        "import sys, tensorfile, tensorfile.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('tensorfile.benchmarks')))\n"
        "tensorfile.cli.main(['bench', '--help'])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split("\n", 1)
    assert first == "[]"  # importing the package and its CLI loads no benchmark
    assert rest.startswith("usage: tensorfile bench ") and "--sweep-sizes" in rest
