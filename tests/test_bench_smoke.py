"""The benchmark at a tiny size: it runs end to end, its JSON has every system and numeric figures, and a failing peer is reported rather than dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorfile import _bench

SYSTEMS = ["raw", "tensorfile", "torch", "safetensors"]


@pytest.mark.slow
def test_bench_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    # Two of the three workloads keep this under half a minute: each child imports torch.
    p = subprocess.run(
        [
            sys.executable, "-m", "tensorfile", "bench",
            "--size-mb", "4", "--small-count", "200", "--reps", "1",
            "--workloads", "transformer-fp32,small-fp32",
            "--dir", str(work), "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "machine:" in p.stdout and "save, durable (fsync)" in p.stdout
    assert os.listdir(work) == []  # the files and the per-run directory are gone

    report = json.loads(out.read_text())
    m = report["machine"]
    for key in (
        "cores",
        "memory_gib",
        "filesystem",
        "python",
        "torch",
        "numpy",
        "safetensors",
        "tensorfile",
    ):
        assert m[key], key
    assert report["config"]["reps"] == 1
    assert [w["name"] for w in report["workloads"]] == ["transformer-fp32", "small-fp32"]
    assert next(w for w in report["workloads"] if w["name"] == "small-fp32")["tensors"] == 200

    rows = {(r["workload"], r["system"], r["measure"]): r for r in report["results"]}
    for w in ("transformer-fp32", "small-fp32"):
        for s in SYSTEMS:
            measures = _bench.RAW_MEASURES if s == "raw" else _bench.SYSTEM_MEASURES
            for meas in measures:
                r = rows[(w, s, meas)]
                if s in ("raw", "tensorfile"):
                    assert not r["failed"], r
                if r["failed"]:  # a peer may fail, but then it says why
                    assert r["errors"] and r["gbps"] is None
                    continue
                assert isinstance(r["gbps"], float) and r["gbps"] > 0, r
                assert r["rss_peak_mib"] > 0, r
                if s != "raw":
                    assert r["vs_limit"] > 0, r
                    assert r["vs_best_other"] > 0, r
            assert report["child_peak_rss_mib"][w][s] > 0


def test_failing_child_is_reported_not_dropped(tmp_path: Path) -> None:
    spec = {
        "system": "nosuch",
        "workload": "small-fp32",
        "size_mb": 1,
        "small_count": 10,
        "nbytes": 1,
        "count": 10,
        "threads": 1,
        "path": str(tmp_path / "f"),
        "result": str(tmp_path / "r.json"),
    }
    data = _bench._run_child(spec, timeout=120)
    assert set(data["measures"]) == set(_bench.SYSTEM_MEASURES)
    for entry in data["measures"].values():
        assert "unknown system 'nosuch'" in entry["error"]


def test_table_shows_a_failed_peer() -> None:
    info = {"w": {"dtype": "float32", "tensors": 1, "payload_bytes": 10**9}}
    samples = {
        ("w", "raw", "write_fsync"): [{"seconds": 1.0}],
        ("w", "tensorfile", "save_durable"): [{"seconds": 1.25, "rss_peak_mib": 100.0}],
        ("w", "torch", "save_durable"): [{"seconds": 2.5, "rss_peak_mib": 120.0}],
        ("w", "safetensors", "save_durable"): [{"error": "ValueError: shared tensors"}],
    }
    mach = _bench.machine(".")
    report = _bench.summarize(samples, info, mach, config={"reps": 1}, children=[])
    rows = {r["system"]: r for r in report["results"]}
    assert rows["tensorfile"]["gbps"] == pytest.approx(0.8)
    assert rows["tensorfile"]["vs_limit"] == pytest.approx(0.8)
    assert rows["tensorfile"]["vs_best_other"] == pytest.approx(2.0)
    assert rows["torch"]["vs_best_other"] == pytest.approx(0.5)
    assert rows["safetensors"]["failed"] and rows["safetensors"]["gbps"] is None
    text = _bench.table(report)
    assert "FAILED: ValueError: shared tensors" in text
    json.dumps(report)  # everything in it is JSON
