"""The command line, run as a user runs it: `python -m tensorfile ...` in a subprocess, checking output and exit status."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def tf(
    *args: str, cwd: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorfile", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stdout + p.stderr


def test_help_lists_the_commands() -> None:
    p = tf("--help")
    assert p.returncode == 0, p.stderr
    for cmd in ("demo", "bench", "clean", "inspect", "verify"):
        assert re.search(rf"^\s+{cmd}\s", p.stdout, re.M), p.stdout


def test_version() -> None:
    import tensorfile

    p = tf("--version")
    assert p.returncode == 0
    assert tensorfile.__version__ in p.stdout


def test_demo_in_a_chosen_dir(tmp_path: Path) -> None:
    p = tf("demo", "--size-mb", "8", "--runs", "1", "--dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    steps = [
        ">>> x = torch.arange(4)",
        ">>> tensorfile.save(x, 'x-file')",
        "tensor([0, 1, 2, 3])",
        "(tensor([0, 1, 2, 3]), tensor([0., 0., 0., 0.]))",
        "{'x': tensor([0, 1, 2, 3]), 'y': tensor([0., 0., 0., 0.])}",
        ">>> tensorfile.save(net.state_dict(), 'mlp.params')",
        "<All keys matched successfully>",
        ">>> Y_clone = clone(X); Y_clone == Y",
        "speed-up",
        "save (durable: fsync)",
        "load (page cache warm)",
    ]
    at = 0
    for s in steps:  # in this order
        found = out.find(s, at)
        assert found >= 0, f"missing {s!r} after offset {at} in:\n{out}"
        at = found + len(s)
    assert "False" not in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("save (durable", "load (page"))]
    assert len(rows) == 2
    for row in rows:
        *numbers, ratio = row.split()[-5:]
        assert (
            all(float(x) > 0 for x in numbers) and ratio.endswith("x") and float(ratio[:-1]) > 0
        ), row
    # The walkthrough's files stay where the user asked for them; the big ones do not.
    assert sorted(os.listdir(tmp_path)) == ["mlp.params", "mydict", "x-file", "x-files"]
    no_traceback(p)


def test_demo_temp_dir_is_removed() -> None:
    p = tf("demo", "--size-mb", "2", "--runs", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"\(files in (.+?): ", p.stdout)
    assert m, p.stdout
    assert not os.path.exists(m.group(1))


def test_clean_missing_dir_is_a_one_line_error() -> None:
    p = tf("clean", "/does/not/exist")
    assert p.returncode != 0
    no_traceback(p)
    # An editable install may print its rebuild log first; the message is the last line.
    assert p.stderr.strip().splitlines()[-1] == "Error: /does/not/exist: no such directory"
    assert p.stderr.count("Error") == 1


def test_clean_a_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    p = tf("clean", str(f))
    assert p.returncode != 0
    no_traceback(p)
    assert p.stderr.strip().splitlines()[-1] == f"Error: {f}: not a directory"


def test_clean_removes_only_stale_files(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace(".", "_")[:32]
    stale = tmp_path / f".model.tf.{host}.{dead.pid}.0badf00d.tftmp"
    live = tmp_path / f".model.tf.{host}.{os.getpid()}.0badf00d.tftmp"
    kept = tmp_path / "model.tf"
    for f in (stale, live, kept):
        f.write_bytes(b"x")
    p = tf("clean", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert f"removed {stale}" in p.stdout
    assert "1 stale temporary file removed" in p.stdout
    assert not stale.exists() and live.exists() and kept.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--size-mb", "0"],
        ["bench", "--systems", "nosuch"],
        ["bench", "--reps", "0"],
        ["nosuchcommand"],
    ],
)
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    p = tf(*args)
    assert p.returncode == 2
    no_traceback(p)
    assert "Error:" in p.stderr


def _saved(tmp_path: Path) -> Path:
    import tensorfile
    import torch

    path = tmp_path / "ckpt.tf"
    obj = {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 3}
    tensorfile.save(obj, path, metadata={"run": "baseline"})
    return path


def test_inspect_table_and_json(tmp_path: Path) -> None:
    import json

    path = _saved(tmp_path)
    p = tf("inspect", str(path))
    assert p.returncode == 0, p.stderr
    assert "tensorfile 1.0" in p.stdout
    assert re.search(r"^model\.w\s+float32\s+2x3\s+24\s+4096\s+cpu", p.stdout, re.M), p.stdout
    assert re.search(r"^model\.b\s+bfloat16\s+3\s+6\s+8192\s+cpu", p.stdout, re.M), p.stdout
    assert "run: baseline" in p.stdout
    p = tf("inspect", "--json", str(path))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout[p.stdout.index("{") :])
    assert [t["key"] for t in info["tensors"]] == ["model.w", "model.b"]
    assert info["tensors"][1] == {
        "key": "model.b",
        "kind": "torch",
        "dtype": "bfloat16",
        "shape": [3],
        "nbytes": 6,
        "file_offset": 8192,
        "device": "cpu",
        "storage": 1,
    }
    assert info["metadata"] == {"run": "baseline"} and info["file_nbytes"] == path.stat().st_size


def test_verify_exit_status(tmp_path: Path) -> None:
    good = _saved(tmp_path)
    bad = tmp_path / "bad.tf"
    data = bytearray(good.read_bytes())
    data[4096] ^= 0x10  # a bit of the first storage
    bad.write_bytes(bytes(data))
    p = tf("verify", str(good))
    assert p.returncode == 0 and re.search(r"^ok\s+.*ckpt\.tf$", p.stdout, re.M), p.stdout + p.stderr
    p = tf("verify", str(good), str(bad), str(tmp_path / "missing.tf"))
    assert p.returncode == 1
    assert re.search(r"^ok\s+.*ckpt\.tf$", p.stdout, re.M)
    assert re.search(r"^FAIL .*bad\.tf: .*checksum mismatch", p.stdout, re.M), p.stdout
    assert re.search(r"^FAIL .*missing\.tf: .*No such file", p.stdout, re.M), p.stdout
    no_traceback(p)
