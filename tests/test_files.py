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
from tensorfile import _files, _io

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
    src = _io.Source(path)
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


# --------------------------------------------------------------------------- temporary files

# A writer that stops as it starts writing and goes on when told; with its pid replaced by
# one that names no process here, as a writer in another pid namespace (a container on a
# shared volume) looks from this one.
WRITER = textwrap.dedent(
    """
    import os, sys, torch, tensorfile
    from tensorfile import _files
    path, pid = sys.argv[1], int(sys.argv[2])
    if pid:
        os.getpid = lambda: pid

    def phase(name):
        if name == "writing":
            print("writing", flush=True)
            sys.stdin.readline()

    _files.phase = phase
    tensorfile.save({"x": torch.arange(10)}, path)
    print("saved", flush=True)
    """
)


def _start_writer(path: Path, pid: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "writing\n"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    proc.wait()


def test_a_live_writer_keeps_its_file_whatever_its_pid_says(tmp_path: Path) -> None:
    proc = _start_writer(tmp_path / "ckpt.tf", FOREIGN_PID)
    try:
        (tmp,) = _tmps(tmp_path)
        assert f".{HOST}.{FOREIGN_PID}." in tmp
        tensorfile.save(torch.zeros(1), tmp_path / "other.tf")  # cleans the directory
        assert tensorfile.clean(tmp_path) == []
        assert _tmps(tmp_path) == [tmp]
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0 and out == "saved\n"
    assert torch.equal(tensorfile.load(tmp_path / "ckpt.tf")["x"], torch.arange(10))
    assert _tmps(tmp_path) == []


@pytest.mark.parametrize("pid", [0, FOREIGN_PID], ids=["own-pid", "foreign-pid"])
def test_a_dead_writers_file_is_removed(tmp_path: Path, pid: int) -> None:
    proc = _start_writer(tmp_path / "ckpt.tf", pid)
    _stop(proc)
    (tmp,) = _tmps(tmp_path)
    assert tensorfile.clean(tmp_path) == [str(tmp_path / tmp)]
    assert _tmps(tmp_path) == []


LOCKER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def test_a_locked_file_is_kept_until_its_holder_goes(tmp_path: Path) -> None:
    tmp = tmp_path / f".ckpt.tf.{HOST}.{FOREIGN_PID}.0badf00d.tftmp"
    tmp.write_bytes(b"x")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        assert tensorfile.clean(tmp_path) == []
        assert tmp.exists()
        proc.communicate("\n", timeout=60)
    finally:
        _stop(proc)
    assert tensorfile.clean(tmp_path) == [str(tmp)]


def test_a_pid_too_large_for_the_os_does_not_stop_a_save(tmp_path: Path) -> None:
    ours = tmp_path / f".x.{HOST}.99999999999999999999.abcd1234.tftmp"
    not_ours = tmp_path / f".x.{HOST}.99999999999999999999.a.tftmp"
    for p in (ours, not_ours):
        p.write_bytes(b"x")
    tensorfile.save(torch.ones(2), tmp_path / "x")
    assert torch.equal(tensorfile.load(tmp_path / "x"), torch.ones(2))
    assert not ours.exists() and not_ours.exists()


def test_only_tensorfiles_own_regular_files_are_removed(tmp_path: Path) -> None:
    def name(host: str = HOST, token: str = "0badf00d") -> str:
        return f".ckpt.tf.{host}.{FOREIGN_PID}.{token}.tftmp"

    stale = tmp_path / name()
    a_dir = tmp_path / name(token="00000001")
    a_fifo = tmp_path / name(token="00000002")
    a_link = tmp_path / name(token="00000003")
    linked = tmp_path / "linked.tf"
    other_host = tmp_path / name(host="elsewhere")
    notes = tmp_path / ".notes.tftmp"
    no_token = tmp_path / f".ckpt.tf.{HOST}.{FOREIGN_PID}.tftmp"
    for p in (stale, linked, other_host, notes, no_token):
        p.write_bytes(b"x")
    a_dir.mkdir()
    os.mkfifo(a_fifo)
    a_link.symlink_to(linked)
    assert tensorfile.clean(tmp_path) == [str(stale)]
    left = {a_dir, a_fifo, a_link, linked, other_host, notes, no_token}
    assert set(tmp_path.iterdir()) == left
    tensorfile.save(torch.ones(2), tmp_path / "ckpt.tf")
    assert set(tmp_path.iterdir()) == left | {tmp_path / "ckpt.tf"}


def test_a_file_that_cannot_be_removed_is_reported_and_never_fails_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / f".ckpt.tf.{HOST}.{FOREIGN_PID}.0badf00d.tftmp"
    stale.write_bytes(b"x")
    unlink = os.unlink

    def refuse(path: str, *args: object, **kwargs: object) -> None:
        if str(path) == str(stale):
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", refuse)
    problems: list[tuple[str, str]] = []
    assert tensorfile.clean(tmp_path, on_error=lambda p, e: problems.append((p, e.strerror))) == []
    assert problems == [(str(stale), "Permission denied")]
    tensorfile.save(torch.ones(2), tmp_path / "ckpt.tf")
    assert stale.exists()
    assert torch.equal(tensorfile.load(tmp_path / "ckpt.tf"), torch.ones(2))


def test_a_save_whose_new_file_a_cleaner_locked_first_takes_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = _files._lock
    calls = []

    def lost_first(fd: int) -> bool:
        calls.append(fd)
        return len(calls) > 1 and lock(fd)

    monkeypatch.setattr(_files, "_lock", lost_first)
    monkeypatch.setattr(_files, "_clean_quietly", lambda directory: None)
    tensorfile.save(torch.ones(2), tmp_path / "ckpt.tf")
    assert len(calls) == 2
    # The first file is left to the cleaner that holds its lock; the second was renamed.
    assert len(_tmps(tmp_path)) == 1
    assert torch.equal(tensorfile.load(tmp_path / "ckpt.tf"), torch.ones(2))


# --------------------------------------------------------------------------- same_file


def test_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    (tmp_path / "sym.tf").symlink_to(a)
    os.link(a, tmp_path / "hard.tf")
    (tmp_path / "sub").mkdir()
    assert _files.same_file(a, tmp_path / "sym.tf")
    assert _files.same_file(tmp_path / "hard.tf", a)
    assert _files.same_file(a, tmp_path / "sub" / ".." / "a.pt")
    assert not _files.same_file(a, b)
    assert not _files.same_file(a, tmp_path / "missing.tf")
    assert not _files.same_file(tmp_path / "missing.tf", tmp_path / "missing.tf")


def test_convert_refuses_an_out_that_is_in_through_a_link(tmp_path: Path) -> None:
    from tensorfile import _convert

    src = tmp_path / "model.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    before = src.read_bytes()
    (tmp_path / "model.tf").symlink_to(src)
    os.link(src, tmp_path / "hard.tf")
    for out in ("model.tf", "hard.tf"):
        with pytest.raises(ValueError, match="same file"):
            _convert.convert(str(src), str(tmp_path / out), "tensorfile")
        p = subprocess.run(
            [sys.executable, "-m", "tensorfile", "convert", str(src), str(tmp_path / out)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert p.returncode != 0
        assert p.stderr.strip().splitlines()[-1] == "Error: IN and OUT are the same file"
        assert "Traceback" not in p.stderr
    assert src.read_bytes() == before
    assert (tmp_path / "model.tf").is_symlink()
