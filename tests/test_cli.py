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
    for cmd in ("demo", "bench", "clean", "inspect", "verify", "convert", "diff"):
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
    # The temporary directory is gone when the demo ends, so it is not named.
    assert "tensorfile-demo-" not in p.stdout, p.stdout
    assert "(files written: mlp.params, mydict, x-file, x-files; in a temporary directory" in (
        p.stdout
    )


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


def test_clean_passes_over_what_it_did_not_write(tmp_path: Path) -> None:
    host = socket.gethostname().replace(".", "_")[:32]
    foreign = 2**22 + 1  # no process here has it
    stale = tmp_path / f".model.tf.{host}.{foreign}.0badf00d.tftmp"
    huge_pid = tmp_path / f".x.{host}.99999999999999999999.abcd1234.tftmp"
    a_dir = tmp_path / f".model.tf.{host}.{foreign}.00000001.tftmp"
    odd = tmp_path / f".x.{host}.99999999999999999999.a.tftmp"
    for f in (stale, huge_pid, odd):
        f.write_bytes(b"x")
    a_dir.mkdir()
    p = tf("clean", str(tmp_path))
    assert p.returncode == 0, p.stderr
    no_traceback(p)
    assert sorted(p.stdout.splitlines()[:-1]) == sorted([f"removed {stale}", f"removed {huge_pid}"])
    assert p.stdout.splitlines()[-1] == f"2 stale temporary files removed from {tmp_path}"
    assert sorted(tmp_path.iterdir()) == sorted([a_dir, odd])


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
        "held_in": None,
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
    assert p.returncode == 0 and re.search(r"^ok\s+.*ckpt\.tf \(tensorfile", p.stdout, re.M), (
        p.stdout + p.stderr
    )
    p = tf("verify", str(good), str(bad), str(tmp_path / "missing.tf"))
    assert p.returncode == 1
    assert re.search(r"^ok\s+.*ckpt\.tf \(", p.stdout, re.M)
    assert re.search(r"^FAIL .*bad\.tf: .*checksum mismatch", p.stdout, re.M), p.stdout
    assert re.search(r"^FAIL .*missing\.tf: .*No such file", p.stdout, re.M), p.stdout
    no_traceback(p)


# --------------------------------------------------------------------------- other formats


def console(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed `tensorfile` console script, next to this interpreter."""
    exe = Path(sys.executable).with_name("tensorfile")
    assert exe.exists(), f"no console script at {exe}"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def _torch_file(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "model.pt"
    torch.save(
        {"model": {"w": base, "wt": base.t(), "b": torch.ones(2, dtype=torch.bfloat16)}, "step": 7},
        path,
    )
    return path


def test_console_script_inspects_a_torch_save_file(tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    p = console("inspect", str(path))
    assert p.returncode == 0, p.stderr
    assert re.search(
        r"model\.pt: torch\.save zip, archive version \d+, [\d,]+ bytes$", p.stdout, re.M
    ), p.stdout
    assert re.search(r"^model\.wt\s+float32\s+4x3\s+48\s+\d+\s+cpu", p.stdout, re.M), p.stdout
    assert re.search(r"^model\.b\s+bfloat16\s+2\s+4\s", p.stdout, re.M), p.stdout


def test_inspect_and_verify_safetensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    st.save_file(
        {"x": torch.ones(3, 2), "y": torch.zeros(4, dtype=torch.int64)},
        str(path),
        metadata={"a": "b"},
    )
    p = tf("inspect", "--json", str(path))
    import json

    info = json.loads(p.stdout[p.stdout.index("{") :])
    assert info["format"] == "safetensors" and info["metadata"] == {"a": "b"}
    assert {t["key"]: t["shape"] for t in info["tensors"]} == {"x": [3, 2], "y": [4]}
    bad = tmp_path / "trail.safetensors"
    bad.write_bytes(path.read_bytes() + b"\0")
    p = tf("verify", str(path), str(bad))
    assert p.returncode == 1
    assert re.search(r"^ok\s+.*m\.safetensors \(safetensors", p.stdout, re.M), p.stdout
    assert re.search(r"^FAIL .*trail\.safetensors: .*trailing bytes", p.stdout, re.M), p.stdout


def test_verify_catches_a_flipped_byte_in_a_torch_save_file(tmp_path: Path) -> None:
    import struct
    import zipfile

    path = _torch_file(tmp_path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    nlen, elen = struct.unpack_from(
        "<HH", data, info.header_offset + 26
    )  # the local header's own lengths
    data[info.header_offset + 30 + nlen + elen + 5] ^= 1
    path.write_bytes(bytes(data))
    p = tf("verify", "--quiet", str(path))
    assert p.returncode == 1 and "checksum mismatch" in p.stdout, p.stdout
    no_traceback(p)


def test_convert_between_formats_and_diff(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import tensorfile

    src = _torch_file(tmp_path)
    want = torch.load(src)
    tf_out = tmp_path / "m.tf"
    p = tf("convert", str(src), str(tf_out))
    assert p.returncode == 0 and "(tensorfile) from" in p.stdout, p.stdout + p.stderr
    got = tensorfile.load(tf_out)
    assert got["step"] == 7 and torch.equal(got["model"]["wt"], want["model"]["wt"])
    assert (
        got["model"]["wt"].untyped_storage().data_ptr()
        == got["model"]["w"].untyped_storage().data_ptr()
    )
    st_out = tmp_path / "m.safetensors"
    p = tf("convert", str(src), str(st_out))
    assert p.returncode == 1 and "--skip-non-tensors" in p.stderr and "step" in p.stderr, p.stderr
    assert not st_out.exists()
    p = tf("convert", str(src), str(st_out), "--skip-non-tensors")
    assert p.returncode == 0 and "left out 1 non-tensor" in p.stdout, p.stdout + p.stderr
    st = pytest.importorskip("safetensors.torch")
    flat = st.load_file(str(st_out))
    assert torch.equal(flat["model.wt"], want["model"]["wt"]) and flat["model.wt"].is_contiguous()
    back = tmp_path / "back.tf"
    assert tf("convert", str(st_out), str(back), "--to", "tensorfile").returncode == 0
    # diff across formats: identical tensors exit 0, a change exits 1 and is named
    p = tf("diff", str(st_out), str(back))
    assert p.returncode == 0, p.stdout + p.stderr
    p = tf("diff", str(src), str(st_out), "--tensors-only")
    assert p.returncode == 0 and "3 identical" in p.stdout, p.stdout
    p = tf("diff", str(src), str(st_out))  # the safetensors file has no "step"
    assert p.returncode == 1 and "3 identical" in p.stdout, p.stdout
    assert re.search(r"^only in A: step$", p.stdout, re.M), p.stdout
    changed = dict(want["model"])
    changed["w"] = want["model"]["w"] + 0.5
    changed["b"] = torch.ones(3, dtype=torch.bfloat16)
    changed["new"] = torch.zeros(1)
    other = tmp_path / "other.safetensors"
    tensorfile.save_safetensors({f"model.{k}": v for k, v in changed.items() if k != "wt"}, other)
    p = tf("diff", str(src), str(other))
    assert p.returncode == 1
    assert re.search(r"^only in A: model\.wt$", p.stdout, re.M), p.stdout
    assert re.search(r"^only in B: model\.new$", p.stdout, re.M), p.stdout
    assert re.search(r"^changed:\s+model\.b: bfloat16\[2\] -> bfloat16\[3\]$", p.stdout, re.M), (
        p.stdout
    )
    assert re.search(r"^differs:\s+model\.w: max abs difference 0\.5$", p.stdout, re.M), p.stdout


def test_convert_errors_are_one_line(tmp_path: Path) -> None:
    p = tf("convert", str(tmp_path / "missing.pt"), str(tmp_path / "out.tf"))
    assert p.returncode == 2 and "does not exist" in p.stderr
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    p = tf("convert", str(garbage), str(tmp_path / "out.tf"))
    assert p.returncode == 1 and "garbage.bin" in p.stderr, p.stderr
    assert not (tmp_path / "out.tf").exists()
    no_traceback(p)


def test_progress_bars_stay_off_a_pipe(tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    p = tf("verify", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "%|" not in p.stderr and "B/s" not in p.stderr, p.stderr


def test_convert_streams_in_bounded_memory(tmp_path: Path) -> None:
    """A 384 MiB checkpoint converts with far less extra memory than its size."""
    torch = pytest.importorskip("torch")
    src = tmp_path / "big.pt"
    torch.save({f"layer{i}": torch.zeros(8 << 20, dtype=torch.float32) for i in range(12)}, src)
    code = (
        "import resource, sys, torch, tensorfile\n"
        "from tensorfile import _convert\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "_convert.convert(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((peak - base) // 1024)\n"
    )
    for to, out in (("tensorfile", "big.tf"), ("safetensors", "big.safetensors")):
        r = subprocess.run(
            [sys.executable, "-c", code, str(src), str(tmp_path / out), to],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        grew_mib = int(r.stdout.strip().splitlines()[-1])
        assert grew_mib < 160, f"{to}: RSS grew by {grew_mib} MiB converting a 384 MiB file"


def _stderr_on_a_terminal(*args: str) -> str:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a sized terminal
    try:
        p = subprocess.run(
            [sys.executable, "-m", "tensorfile", *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the terminal is closed and drained
                break
            if not data:
                break
            chunks.append(data)
        assert p.returncode == 0, p.stdout
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)


def test_progress_bars_on_a_terminal_and_quiet(tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    assert "model.pt" in _stderr_on_a_terminal("verify", str(path))  # the bar is labelled
    quiet = _stderr_on_a_terminal("--quiet", "verify", str(path))
    quiet_after = _stderr_on_a_terminal("verify", "-q", str(path))
    assert "model.pt" not in quiet and "model.pt" not in quiet_after, quiet + quiet_after


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_dcp_directories_both_ways(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    import tensorfile
    import tensorfile.dcp

    state = {"model": {"w": torch.randn(6, 4), "b": torch.arange(4.0)}, "step": torch.tensor(9)}
    stock = tmp_path / "stock_ckpt"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(stock)), no_dist=True)
    out = tmp_path / "from_dcp.tf"
    p = tf("convert", str(stock), str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    got = tensorfile.load(out)
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and int(got["step"]) == 9
    # and back: a tensorfile to a DCP directory written by tensorfile's plugin
    again = tmp_path / "again_ckpt"
    p = tf("convert", str(out), str(again), "--to", "dcp")
    assert p.returncode == 0, p.stdout + p.stderr
    reloaded = {"model": {"w": torch.zeros(6, 4), "b": torch.zeros(4)}, "step": torch.tensor(0)}
    dcp.load(reloaded, storage_reader=tensorfile.dcp.StorageReader(str(again)), no_dist=True)
    assert torch.equal(reloaded["model"]["w"], state["model"]["w"]) and int(reloaded["step"]) == 9
    p = tf("diff", str(stock), str(again))
    assert p.returncode == 0, p.stdout + p.stderr
