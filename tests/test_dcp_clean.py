"""`tensorfile clean` in a checkpoint directory: the rank files of a save that died before
its commit are removed; those of a committed checkpoint or of a save still running never."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dcp_worker
import pytest
import tensorfile.dcp as tdcp
import torch
from click.testing import CliRunner
from tensorfile.cli import main as cli

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TESTS = Path(__file__).resolve().parent


def _saver(path: Path, version: int, how: str) -> subprocess.Popen[str]:
    """A process saving `version` into `path` that stops before the commit (see
    _dcp_worker.stop_before_commit)."""
    code = f"import _dcp_worker; _dcp_worker.stop_before_commit({str(path)!r}, {version}, {how!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])},
    )


def _rank_files(d: Path) -> set[str]:
    return {n for n in os.listdir(d) if n.endswith(".tf")}


def _committed(d: Path) -> set[str]:
    return {name for name, _ in json.loads((d / tdcp.METADATA_NAME).read_text())["files"]}


def test_clean_removes_the_rank_files_of_a_dead_save(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp(_dcp_worker.full_state(1), d)
    old = _committed(d)
    p = _saver(d, 2, "die")
    p.communicate(timeout=300)
    assert p.returncode == -9
    dead = _rank_files(d) - old
    assert len(dead) == 1  # written whole, never committed
    r = CliRunner().invoke(cli, ["clean", str(d)])
    assert r.exit_code == 0, r.output
    assert f"removed {d / next(iter(dead))}" in r.output
    assert "1 uncommitted rank file of dead checkpoint saves removed" in r.output
    assert _rank_files(d) == old and not [n for n in os.listdir(d) if n.endswith(".lock")]
    got = tdcp.dcp_to_state_dict(d)  # the committed checkpoint is untouched
    assert torch.equal(got["model"]["big"], _dcp_worker.full_state(1)["model"]["big"])


def test_clean_keeps_the_rank_files_of_a_running_save(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp(_dcp_worker.full_state(1), d)
    old = _committed(d)
    p = _saver(d, 2, "wait")
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        live = _rank_files(d) - old
        assert len(live) == 1
        assert tdcp.clean(d) == []
        r = CliRunner().invoke(cli, ["clean", str(d)])
        assert r.exit_code == 0 and "uncommitted" not in r.output, r.output
        assert _rank_files(d) == old | live
    finally:
        p.communicate(timeout=300)  # closes its stdin: it exits without committing
    assert p.returncode == 0
    assert [os.path.basename(x) for x in tdcp.clean(d) if x.endswith(".tf")] == sorted(live)
    assert _rank_files(d) == old


def test_clean_refuses_to_guess_when_a_commit_record_is_unreadable(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, d)
    files = _rank_files(d)
    (d / tdcp.METADATA_NAME).write_text("{not json")
    r = CliRunner().invoke(cli, ["clean", str(d)])
    assert r.exit_code == 1 and "no rank files were removed" in r.output, r.output
    assert _rank_files(d) == files


def test_the_next_commit_removes_what_a_failed_save_of_this_process_left(tmp_path: Path) -> None:
    """A save that failed in a process that lives on (the training loop continues) holds
    its markers until that process saves into the directory again."""
    d = tmp_path / "ck"
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, d)
    from tensorfile.dcp import _writer

    real = _writer.StorageWriter.finish

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    _writer.StorageWriter.finish = fail  # type: ignore[method-assign]
    try:
        with pytest.raises(BaseException, match="No space left"):
            tdcp.state_dict_to_dcp({"w": torch.randn(4)}, d)
    finally:
        _writer.StorageWriter.finish = real  # type: ignore[method-assign]
    assert len(_rank_files(d)) == 2
    assert tdcp.clean(d) == []  # this process is alive and may still be in that save
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, d)
    assert _rank_files(d) == _committed(d) and len(_committed(d)) == 1
    assert not [n for n in os.listdir(d) if ".lock" in n]
