"""Local files: what a path may name (never a FIFO or a device), the mode and owner a
replaced file keeps, how temporary files of live and dead writers are told apart, and
same_file."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tensorfile
import torch
from tensorfile import _files

HOST = socket.gethostname().replace(".", "_")[:32]
# Above Linux's largest pid_max (2**22): no process here can have it, as a writer in
# another pid namespace would look from this one.
FOREIGN_PID = 2**22 + 1


def _tmps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tftmp"))


# --------------------------------------------------------------------------- what a path may name


def test_fifo_is_refused_by_load_open_and_verify(tmp_path: Path) -> None:
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    # In a child with a timeout: opening a FIFO for reading waits for a writer forever.
    script = textwrap.dedent(
        """
        import sys, tensorfile
        for call in (tensorfile.load, tensorfile.open):
            try:
                call(sys.argv[1])
            except tensorfile.FormatError as e:
                print(e)
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"{fifo}: not a regular file (a named pipe)"] * 2
    p = subprocess.run(
        [sys.executable, "-m", "tensorfile", "verify", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1
    assert p.stdout.splitlines() == [f"FAIL {fifo}: not a regular file (a named pipe)"]
    assert "Traceback" not in p.stderr


def test_devices_are_refused_without_reading() -> None:
    with pytest.raises(
        tensorfile.FormatError, match=r"^/dev/zero: not a regular file \(a character device\)$"
    ):
        tensorfile.load("/dev/zero")


def test_a_directory_is_still_a_directory_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tensorfile.load(tmp_path)


def test_a_regular_file_is_read_with_a_blocking_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "x.tf"
    tensorfile.save(torch.arange(3), path)
    src = _files.Source(path)
    try:
        assert src.fd is not None
        assert fcntl.fcntl(src.fd, fcntl.F_GETFL) & os.O_NONBLOCK == 0
        assert src.nbytes == path.stat().st_size
    finally:
        src.close()
