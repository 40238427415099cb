"""bench/manager.py and bench/incremental.py at a tiny size: they run end to end, clean up
what they wrote, and print every system's figures and every target's verdict."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(script: str, tmp_path: Path, *args: str) -> str:
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run(
        [sys.executable, str(BENCH / script), "--size-mib", "4", "--runs", "1",
         "--dir", str(work), *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert os.listdir(work) == []  # every directory it wrote is gone
    return p.stdout


@pytest.mark.slow
def test_manager_loop_prints_every_system_and_both_ratios(tmp_path: Path) -> None:
    out = _run("manager.py", tmp_path, "--saves", "3")
    for system in ("manager", "torch loop", "raw"):
        row = re.search(rf"^{system} +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)$", out, re.M)
        assert row is not None, out
        assert float(row[1]) > 0, out
    assert re.search(r"^manager +[0-9.]+ +[0-9.]+ +[0-9.]+ +1\.00$", out, re.M), out
    assert re.search(r"manager/torch loop = [0-9.]+ .*manager/raw = [0-9.]+", out), out


@pytest.mark.slow
def test_incremental_prints_a_verdict_per_target(tmp_path: Path) -> None:
    out = _run("incremental.py", tmp_path)
    assert re.search(r"trainable \d+\.\d% of its bytes", out), out
    verdicts = re.findall(r"^  (PASS|MISS) \((a|b|c)\) .*: .*[0-9]", out, re.M)
    assert [v[1] for v in verdicts] == ["a", "b", "c"], out
    # A full save's second save allocates about the state dict's 4 MiB.
    full = re.search(r"^trainable +full +[0-9.]+ +([0-9.]+) +([0-9.]+)", out, re.M)
    assert full is not None and 3.9 <= float(full[1]) <= 5 and 3.9 <= float(full[2]) <= 5, out
