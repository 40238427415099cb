"""Crash tests: a save killed at any moment, or stopped by a file-size limit, leaves the
target holding the complete old file or the complete new one."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tensorfile
import torch

NUMEL = 125 * 2**20  # 500 MiB of float32: the data phase takes a measurable while

CHILD = textwrap.dedent(
    """
    import sys, torch, tensorfile
    version, numel, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    obj = {
        "version": version,
        "big": torch.full((numel,), float(version)),
        "small": [torch.full((i + 1,), float(version)) for i in range(50)],
    }
    tensorfile.save(obj, path)
    """
)


def _check(path: str, allowed: tuple[int, ...]) -> int:
    """Loads the target and proves it is one complete version; returns which."""
    obj = tensorfile.load(path)
    v = obj["version"]
    assert v in allowed
    assert obj["big"].shape == (NUMEL,) and bool(obj["big"].eq(float(v)).all())
    assert all(
        bool(t.eq(float(v)).all()) and t.numel() == i + 1 for i, t in enumerate(obj["small"])
    )
    return v


def _run_child(
    path: str, version: int, kill_after: str | None, delay: float, extra_env: dict | None = None
):
    """Runs a saving child; SIGKILLs it `delay` seconds after it reports phase `kill_after`.
    Returns (phases seen, return code)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, TENSORFILE_TEST_PHASE_FD=str(write_fd), **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(version), str(NUMEL), path],
        env=env,
        pass_fds=(write_fd,),
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    seen: list[str] = []
    stamps: dict[str, float] = {}
    buf = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(64)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                seen.append(line.decode())
                stamps[seen[-1]] = time.perf_counter()
                if kill_after is not None and seen[-1] == kill_after:
                    if delay:
                        time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    _run_child.stamps = stamps  # type: ignore[attr-defined]
    return seen, proc.returncode


@pytest.mark.slow
def test_kill_at_every_moment_of_a_save(tmp_path):
    path = str(tmp_path / "ckpt.tf")
    seen, rc = _run_child(path, 1, None, 0)
    assert rc == 0, "the first save must succeed"
    assert _check(path, (1,)) == 1
    phases = ["created", "writing", "header", "fsync", "rename", "fsync-dir", "done"]
    assert seen == phases

    # How long the save lasts from its first write to its end, to spread kills across it.
    seen, rc = _run_child(path, 2, None, 0)
    assert rc == 0
    stamps = _run_child.stamps  # type: ignore[attr-defined]
    total = stamps["done"] - stamps["writing"]
    assert _check(path, (2,)) == 2

    moments = [(p, 0.0) for p in phases[:-1]]
    moments += [("writing", total * k / 20) for k in range(1, 15)]
    outcomes = []
    version = 2
    for phase, delay in moments:
        old, new = version, 3 - version  # alternate so old and new always differ
        seen, rc = _run_child(path, new, phase, delay)
        got = _check(path, (old, new))
        outcomes.append((phase, round(delay, 3), rc, seen[-1], got))
        # Whatever happened, the file is one whole version: the old one until the child
        # started its rename, the new one once it got past it.
        if "rename" not in seen:
            assert got == old, outcomes
        if "fsync-dir" in seen or rc == 0:
            assert got == new, outcomes
        version = got
    assert len(outcomes) >= 20
    killed_before_rename = [
        o for o in outcomes if o[2] == -signal.SIGKILL and o[3] != "rename" and o[3] != "fsync-dir"
    ]
    # The four kills at the steps before the rename always land there; the timed ones
    # land before it too unless this save runs much faster than the calibration one.
    assert len(killed_before_rename) >= 6, outcomes
    # A killed writer leaves its temporary file; it is recognisable by name, and the
    # next save into the directory removes it (each save above already did so).
    _run_child(path, 3 - version, "writing", 0)
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tftmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.tf."), leftovers
    tensorfile.save({"x": torch.zeros(1)}, str(tmp_path / "other.tf"))
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tftmp")] == []


def _limit_file_size(nbytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@pytest.mark.slow
def test_file_size_limit_keeps_old_file(tmp_path):
    path = str(tmp_path / "ckpt.tf")
    _seen, rc = _run_child(path, 1, None, 0)
    assert rc == 0
    before = os.path.getsize(path)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "2", str(NUMEL), path],
        preexec_fn=_limit_file_size(64 << 20),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "File too large" in proc.stderr and "the previous file is intact" in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert os.path.getsize(path) == before
    assert _check(path, (1,)) == 1
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tftmp")] == []
