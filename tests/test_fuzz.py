"""Fuzzing in the test suite: the checked-in corpus (seeds and every past crash) replays
through every target as regression tests, and atheris explores for about a minute with
each: fuzz_load.py (any bytes as a file) and fuzz_pickle.py (torch.save pickles built
opcode by opcode: nesting, memo indices, frames)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
TARGET = ROOT / "fuzz" / "fuzz_load.py"
PICKLE_TARGET = ROOT / "fuzz" / "fuzz_pickle.py"


def _load_target(path=TARGET):
    pytest.importorskip("atheris")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_corpus_replays_cleanly(name):
    """Each corpus input either loads or raises FormatError (the target re-raises
    anything else)."""
    target = _load_target()
    target.test_one_input((CORPUS / name).read_bytes())


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_corpus_replays_cleanly_as_pickles(name):
    """Each corpus input, read as fuzz_pickle.py reads it, loads or raises FormatError."""
    target = _load_target(PICKLE_TARGET)
    target.test_one_input((CORPUS / name).read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("target", [TARGET, PICKLE_TARGET], ids=["load", "pickle"])
def test_fuzz_for_a_minute(tmp_path, target):
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("TENSORFILE_FUZZ_SECONDS", "60"))
    proc = subprocess.run(
        [
            sys.executable,
            str(target),
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
    )
    crashes = [
        p.name
        for p in tmp_path.iterdir()
        if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))
    ]
    assert proc.returncode == 0 and not crashes, (
        f"the fuzzer found {crashes}: copy them into fuzz/corpus as regression files\n{proc.stderr[-4000:]}"
    )
    assert "DONE" in proc.stderr or "Done" in proc.stderr
