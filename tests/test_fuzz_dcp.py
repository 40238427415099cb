"""Fuzzing of DCP checkpoint metadata in the test suite (fuzz/fuzz_dcp.py): the checked-in
corpus (seeds and every past finding) replays as regression tests, and atheris explores
hostile commit records and stock `.metadata` pickles for a bounded time."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus-dcp"
TARGET = ROOT / "fuzz" / "fuzz_dcp.py"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def target() -> Any:
    pytest.importorskip("atheris")
    spec = importlib.util.spec_from_file_location("fuzz_dcp", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_dcp_corpus_replays_cleanly(target: Any, name: str) -> None:
    """Each input reads or raises FormatError on every path (the target re-raises
    anything else)."""
    target.test_one_input((CORPUS / name).read_bytes())


def test_dcp_seeds_are_valid_checkpoints(target: Any) -> None:
    """The seeds reach past the checks: each reads whole."""
    import tensorfile.dcp as tdcp

    for name in ("seed-record", "seed-stock"):
        raw = (CORPUS / name).read_bytes()
        d, file = (target.STOCK, ".metadata") if raw[0] & 1 else (target.OURS, tdcp.METADATA_NAME)
        Path(d, file).write_bytes(raw[1:])
        got = tdcp.dcp_to_state_dict(d)
        assert got["step"] == 7 and got["model"]["w"].tolist() == target.W.tolist()


@pytest.mark.slow
def test_fuzz_dcp_metadata_for_a_minute(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("TENSORFILE_FUZZ_SECONDS", "60"))
    proc = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            str(tmp_path),  # new inputs land here, never in the checked-in corpus
            str(CORPUS),
            f"-max_total_time={seconds}",
            "-rss_limit_mb=2048",
            "-max_len=16384",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    crashes = [
        p.name
        for p in tmp_path.iterdir()
        if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))
    ]
    assert proc.returncode == 0 and not crashes, (
        f"the fuzzer found {crashes}: copy them into fuzz/corpus-dcp as regression files\n"
        f"{proc.stderr[-4000:]}"
    )
    assert "Done" in proc.stderr or "DONE" in proc.stderr
