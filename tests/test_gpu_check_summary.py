"""bench/gpu_check.sh's summary, run on the CPU from a report shaped like the GPU
benchmark's: it prints the CPU seconds per GB, GPUDirect with and without registered
buffers, and the memory after one load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_reports_cpu_cost_registration_and_memory(tmp_path):
    res = {
        "tensorfile_load_gds": {"gbps": 12.5, "cpu_s_per_gb": 0.04},
        "tensorfile_load_gds_unregistered": {"gbps": 7.25, "cpu_s_per_gb": 0.09},
        "tensorfile_load_staging": {"gbps": 20.0, "cpu_s_per_gb": 0.25},
    }
    mem = {"devices_with_memory": 1, "process_mib": 4600, "tensors_mib": 4096.0}
    (tmp_path / "gpu_bench.json").write_text(
        json.dumps({"results": res, "memory_after_first_load": mem})
    )
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    code = f"eval \"$(sed -n '/^summary() {{/,/^}}/p' {script})\"; summary"
    proc = subprocess.run(
        ["bash", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "tensorfile_load_staging\t20.00\t0.250" in proc.stdout
    assert "gds load: registered 12.50 GB/s, unregistered 7.25 GB/s" in proc.stdout
    assert "'devices_with_memory': 1" in proc.stdout
