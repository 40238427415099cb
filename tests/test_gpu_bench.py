"""Smoke test of the GPU benchmark and its driver script: both run here without a GPU,
measuring the host limits and saying that CUDA is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tensorfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], check=True)


def test_gpu_bench_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_bench.py"),
            "--size-mb",
            "2",
            "--repeats",
            "1",
            "--dir",
            str(tmp_path / "data"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["payload_nbytes"] > 1 << 20 and rep["tensors"] > 10
    for limit in ("raw_write_fsync", "hot_read", "cold_read"):
        assert rep["limits"][limit]["gbps"] > 0, limit
    assert not rep["errors"], rep["errors"]
    assert not os.path.exists(tmp_path / "data" / "limit.bin")
    if not tensorfile.cuda_available():
        assert rep["cuda"] is False
        assert "no CUDA" in proc.stdout
        assert rep["results"] == {}
    else:
        assert rep["results"]["tensorfile_load_staging"]["gbps"] > 0
