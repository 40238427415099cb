"""The GPU benchmark and its driver script on this machine: the report and ratio code from
given figures, the benchmark at a tiny size (without a GPU it measures the host limits and
says that CUDA is missing), and bench/gpu_check.sh running its smoke and benchmark phases."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorfile
from tensorfile.benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = ("raw_write_fsync", "hot_read", "cold_read")


def _figures(**gbps: float) -> dict[str, dict[str, float]]:
    return {k: {"gbps": v} for k, v in gbps.items()}


def test_ratios_are_each_result_over_its_limit_and_its_peers() -> None:
    limits = _figures(raw_write_fsync=2.0, hot_read=10.0, cold_read=4.0, pinned_h2d=8.0)
    results = _figures(
        tensorfile_load_staging=6.0,
        tensorfile_load_gds=7.2,
        tensorfile_load_staging_cold=3.0,
        torch_load=1.5,
        safetensors_load=4.0,
        tensorfile_save_staging=1.8,
        torch_save=0.9,
    )
    load_limit, rat = gpu.ratios(limits, results)
    assert load_limit == 8.0  # the pinned copy is slower than the hot read here
    assert rat == {
        "tensorfile_load_staging/min(hot_read,pinned_h2d)": 6.0 / 8.0,
        "tensorfile_load_staging/safetensors_load": 6.0 / 4.0,
        "tensorfile_load_staging/torch_load": 6.0 / 1.5,
        "tensorfile_load_gds/min(hot_read,pinned_h2d)": 7.2 / 8.0,
        "tensorfile_load_gds/safetensors_load": 7.2 / 4.0,
        "tensorfile_load_gds/torch_load": 7.2 / 1.5,
        "tensorfile_load_staging_cold/cold_read": 3.0 / 4.0,
        "tensorfile_save_staging/raw_write_fsync": 1.8 / 2.0,
        "tensorfile_save_staging/torch_save": 1.8 / 0.9,
        # no tensorfile_save_gds figure: none of its ratios
    }
    got = gpu.targets(rat)
    assert {k: t["met"] for k, t in got.items()} == {
        "tensorfile_load_staging/min(hot_read,pinned_h2d)": False,  # 0.75 < 0.8
        "tensorfile_load_gds/min(hot_read,pinned_h2d)": True,  # 0.9
        "tensorfile_load_staging/safetensors_load": False,  # 1.5 < 2
        "tensorfile_load_gds/safetensors_load": False,  # 1.8 < 2
        "tensorfile_save_staging/raw_write_fsync": True,  # 0.9
    }
    assert got["tensorfile_load_gds/min(hot_read,pinned_h2d)"]["ratio"] == 7.2 / 8.0


def test_ratios_without_the_gpu_figures() -> None:
    # The host limits alone (a machine without CUDA): the hot read is the load limit and
    # no ratio has both of its figures.
    load_limit, rat = gpu.ratios(_figures(raw_write_fsync=2.0, hot_read=10.0, cold_read=4.0), {})
    assert load_limit == 10.0 and rat == {} and gpu.targets(rat) == {}
    assert gpu.ratios({}, _figures(tensorfile_load_staging=6.0)) == (None, {})


def test_report_holds_the_ratios_and_the_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(size_mb=1.0, repeats=1, budget_s=60.0, dir=str(tmp_path))
    b = gpu.Bench(args)
    b.report["limits"] = _figures(raw_write_fsync=2.0, hot_read=10.0, pinned_h2d=12.0)
    b.report["results"] = _figures(tensorfile_load_staging=9.0, tensorfile_save_staging=1.0)
    out = tmp_path / "r.json"
    gpu.write_report(b, str(out))
    rep = json.loads(out.read_text())
    assert rep["load_limit_gbps"] == 10.0
    assert rep["ratios"] == {
        "tensorfile_load_staging/min(hot_read,pinned_h2d)": 0.9,
        "tensorfile_save_staging/raw_write_fsync": 0.5,
    }
    assert rep["targets"]["tensorfile_save_staging/raw_write_fsync"] == {
        "ratio": 0.5,
        "at_least": 0.8,
        "met": False,
    }
    text = capsys.readouterr().out
    assert "met    tensorfile_load_staging/min(hot_read,pinned_h2d) >= 0.8: 0.900" in text
    assert "MISSED tensorfile_save_staging/raw_write_fsync >= 0.8: 0.500" in text


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gpu.main(["--help"], prog="bench/gpu_bench.py")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--size-mb", "--dir", "--json", "--repeats", "--budget-s"):
        assert flag in text, flag
    with pytest.raises(SystemExit) as e:
        gpu.main(["--size-mb", "1"])  # --dir and --json are required
    assert e.value.code == 2
    assert "--dir" in capsys.readouterr().err


def _check_host_limits(rep: dict) -> None:
    lim = rep["limits"]
    for name in LIMITS:
        assert lim[name]["gbps"] > 0, name
    # the hot and cold limits are the best of the thread counts measured
    for kind in ("hot_read", "cold_read"):
        per_threads = [v["gbps"] for k, v in lim.items() if k.startswith(kind + "_")]
        assert len(per_threads) >= 1 and lim[kind]["gbps"] == max(per_threads), kind
    w = lim["raw_write_fsync"]
    assert w["gbps"] == pytest.approx(rep["payload_nbytes"] / w["seconds"] / 1e9)


def test_gpu_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"),
            "--size-mb", "2", "--repeats", "1",
            "--dir", str(tmp_path / "data"), "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["payload_nbytes"] > 1 << 20 and rep["tensors"] > 10
    _check_host_limits(rep)
    assert not rep["errors"], rep["errors"]
    assert os.listdir(tmp_path / "data") == []  # the limits' probe file is gone
    if not tensorfile.cuda_available():
        assert rep["cuda"] is False
        assert "no CUDA" in proc.stdout
        assert rep["results"] == {} and rep["ratios"] == {}
        assert rep["load_limit_gbps"] == rep["limits"]["hot_read"]["gbps"]
    else:
        assert rep["results"]["tensorfile_load_staging"]["gbps"] > 0


@pytest.mark.slow
def test_gpu_check_runs_its_smoke_and_benchmark_phases(tmp_path: Path) -> None:
    """The driver script as a GPU machine runs it, limited to the phases that need
    neither a GPU nor a rebuild of the engine in this tree."""
    out, data = tmp_path / "out", tmp_path / "data"
    # The script runs the tree's own tensorfile: build its engine in place first where the
    # tree has none (a fresh clone, as CI has), as a GPU machine's run does.
    built = bool(glob.glob(os.path.join(ROOT, "python", "tensorfile", "_engine*.so")))
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPU_CHECK_PHASES": "smoke,bench" if built else "build,smoke,bench",
        "GPU_BENCH_SIZE_MB": "2",
        "GPU_BENCH_DIR": str(data),
        "GPU_CHECK_BUDGET_S": "360",
    }
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh")],
        env=env, capture_output=True, text=True, timeout=420, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phases = [ln.split("\t") for ln in (out / "phases.tsv").read_text().splitlines()]
    build = [("build", "skipped"), ("build-pip", "skipped")] if built else [("build", "0")]
    assert [(name, status) for name, status, _ in phases] == [
        ("environment", "skipped"),
        *build,
        ("smoke", "0"),
        ("tests-gpu", "skipped"),
        ("tests-staging", "skipped"),
        ("bench", "0"),
        ("summary", "skipped"),
    ]
    log = (out / "gpu_check.log").read_text()
    assert log == proc.stdout  # everything it printed is in the log it leaves
    # the tensorfile of this tree, not an installed copy
    init = os.path.join(ROOT, "python", "tensorfile", "__init__.py")
    assert f"tensorfile from {init}\n" in log and "WARNING" not in log
    assert f"cuda_available {tensorfile.cuda_available()} " in log
    rep = json.loads((out / "gpu_bench.json").read_text())
    assert rep["size_mb"] == 2 and rep["repeats"] == 3  # the script's size, the default repeats
    # the benchmark's budget is what the script had left, less its margin
    assert 0 < rep["budget_s"] <= 360 - 35
    _check_host_limits(rep)
    assert not rep["errors"], rep["errors"]
    assert rep["cuda"] is tensorfile.cuda_available()
    assert not data.exists()  # the data directory is removed at the end
