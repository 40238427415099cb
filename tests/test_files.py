"""Local files: what a path may name (never a FIFO or a device), the mode and owner a
replaced file keeps, how temporary files of live and dead writers are told apart, and
same_file."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
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


# --------------------------------------------------------------------------- mode and owner


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o755], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ckpt.tf"
    tensorfile.save(torch.zeros(2), path)
    os.chmod(path, mode)
    tensorfile.save(torch.ones(2), path)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert torch.equal(tensorfile.load(path), torch.ones(2))
    tensorfile.save_safetensors({"w": torch.ones(2)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_the_temporary_file_is_never_wider_than_the_file_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.tf"
    tensorfile.save(torch.zeros(2), path)
    os.chmod(path, 0o600)
    seen = []

    def phase(name: str) -> None:
        if name == "writing":
            (tmp,) = _tmps(tmp_path)
            seen.append(stat.S_IMODE(os.stat(tmp_path / tmp).st_mode))

    monkeypatch.setattr(_files, "phase", phase)
    tensorfile.save(torch.ones(2), path)
    assert seen == [0o600]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_a_new_file_gets_the_mode_open_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with open(tmp_path / "reference", "w"):
            pass
        tensorfile.save(torch.zeros(2), tmp_path / "new.tf")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "new.tf").stat().st_mode) == want


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_a_replaced_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "theirs.tf"
    tensorfile.save(torch.zeros(2), path)
    os.chown(path, 12345, 12345)
    os.chmod(path, 0o640)
    tensorfile.save(torch.ones(2), path)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 12345, 0o640)
    assert torch.equal(tensorfile.load(path), torch.ones(2))


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_mode(tmp_path: Path) -> None:
    real = tmp_path / "real.tf"
    link = tmp_path / "link.tf"
    tensorfile.save(torch.zeros(2), real)
    os.chmod(real, 0o600)
    link.symlink_to(real)
    tensorfile.save(torch.ones(2), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert torch.equal(tensorfile.load(real), torch.ones(2))
