"""Finding libcudart and libcufile, where cuFile writes its log, when the cuFile driver
may be opened, and which device a plain "cuda" means: the Python side of the CUDA path,
driven with the stand-in libraries (tests/data/fake_*.c) in child processes, since a
process opens libcudart once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from tensorfile import _cuda

HERE = os.path.dirname(os.path.abspath(__file__))


def _build(tmp_path_factory, source: str, name: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build the stand-in libraries")
    lib = str(tmp_path_factory.mktemp("fake") / name)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", lib, os.path.join(HERE, "data", source)], check=True
    )
    return lib


@pytest.fixture(scope="module")
def wheel_root(tmp_path_factory):
    """A site-packages-like directory holding the stand-ins where the nvidia-* wheels of
    CUDA 13 put libcudart and libcufile."""
    root = tmp_path_factory.mktemp("site")
    lib = root / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    shutil.copy(
        _build(tmp_path_factory, "fake_cudart.c", "libcudart.so.13"), lib / "libcudart.so.13"
    )
    shutil.copy(_build(tmp_path_factory, "fake_cufile.c", "libcufile.so.0"), lib / "libcufile.so.0")
    return str(root)


def _child(code: str, cwd: str, env: dict[str, str] | None = None) -> dict:
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=full
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


def test_wheel_locations_are_searched(wheel_root, monkeypatch):
    monkeypatch.setattr(sys, "path", [wheel_root, *sys.path])
    got = _cuda._runtime_candidates()
    assert os.path.join(wheel_root, "nvidia/cu13/lib/libcudart.so.13") in got
    assert got[-1] == ""  # the engine's own search comes last
    assert len(got) == len(set(got))


LOAD_LATER = r"""
import json, sys
from tensorfile import _cuda, _engine
root = sys.argv[1]
first = _engine.cuda_load("/nonexistent/libcudart.so.13")  # a failure: not kept as the answer
sys.path.insert(0, root)                 # as when `import torch` brings the wheels in
second = _cuda._load_runtime()
print("RESULT " + json.dumps({"first": first, "second": second, "library": _engine.cuda_library()}))
"""


def test_a_runtime_found_later_is_used_and_reported_by_its_path(wheel_root, tmp_path):
    out = _child(LOAD_LATER.replace("sys.argv[1]", repr(wheel_root)), str(tmp_path))
    assert out["first"] is False and out["second"] is True
    assert out["library"] == os.path.join(wheel_root, "nvidia/cu13/lib/libcudart.so.13")


OPEN_CUFILE = r"""
import json, os, sys, tempfile
sys.path.insert(0, ROOT)
from tensorfile import _cuda, _engine
ok = _cuda._load_cufile()
print("RESULT " + json.dumps({"ok": ok, "error": _engine.cufile_error(), "cwd": sorted(os.listdir(".")),
                              "log": os.environ.get("CUFILE_LOGFILE_PATH")}))
"""


def test_the_cufile_log_is_not_written_to_the_working_directory(wheel_root, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUFILE_")}
    env["TMPDIR"] = str(tmp_path / "tmp")
    os.mkdir(env["TMPDIR"])
    code = OPEN_CUFILE.replace("ROOT", repr(wheel_root))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(cwd),
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert out["ok"] is True, out
    assert out["cwd"] == [] and os.listdir(cwd) == []
    assert out["log"] == os.path.join(env["TMPDIR"], f"tensorfile-{os.getuid()}", "cufile.log")
    assert os.path.isfile(out["log"])


@pytest.mark.parametrize("name", ["CUFILE_LOGFILE_PATH", "CUFILE_ENV_PATH_JSON"])
def test_a_users_cufile_log_setting_is_kept(monkeypatch, name, tmp_path):
    monkeypatch.delenv("CUFILE_LOGFILE_PATH", raising=False)
    monkeypatch.delenv("CUFILE_ENV_PATH_JSON", raising=False)
    monkeypatch.setenv(name, str(tmp_path / "mine"))
    _cuda._cufile_log_settings()
    assert os.environ[name] == str(tmp_path / "mine")
    if name == "CUFILE_ENV_PATH_JSON":
        assert "CUFILE_LOGFILE_PATH" not in os.environ


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_the_cufile_driver_is_never_opened_without_a_cuda_driver(tmp_path, monkeypatch, mode):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(4096))
    monkeypatch.setattr(_cuda, "_NVIDIA_FS", str(path))  # as if nvidia-fs were loaded
    monkeypatch.setattr(_cuda, "_cufile_state", None)
    monkeypatch.setattr(_cuda, "_cuda_driver_present", lambda: False)

    def never() -> bool:
        raise AssertionError("cuFileDriverOpen would hang here")

    monkeypatch.setattr(_cuda, "_load_cufile", never)
    if mode == "auto":
        assert _cuda._gds_open(str(path), False, mode) == -1
    else:
        with pytest.raises(RuntimeError, match=r"libcuda\.so\.1"):
            _cuda._gds_open(str(path), False, mode)


def test_cuda_driver_presence_matches_the_loader():
    import ctypes.util

    # Where the loader knows no libcuda, it is absent; the test machine decides which.
    if ctypes.util.find_library("cuda") is None and not os.path.exists(
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    ):
        assert _cuda._cuda_driver_present() is False


def _fake_torch(current: int) -> types.SimpleNamespace:
    class Device:
        def __init__(self, kind: str, index: int | None = None) -> None:
            if ":" in kind:
                kind, index = kind.split(":")[0], int(kind.split(":")[1])
            self.type, self.index = kind, index

    return types.SimpleNamespace(
        device=Device,
        cuda=types.SimpleNamespace(current_device=lambda: current),
        UntypedStorage=lambda n, device: types.SimpleNamespace(
            n=n, device=device, data_ptr=lambda: 0
        ),
    )


def test_a_plain_cuda_is_the_current_device_when_saving(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(1))
    assert _cuda.saved_index("cuda") == 1
    assert _cuda.saved_index("cuda:0") == 0


def test_a_plain_cuda_is_the_current_device_when_loading(monkeypatch):
    # _io._read_to_cuda allocates and reads (padding-only reads included) on this index
    torch = _fake_torch(1)
    assert _cuda.device_index(torch, torch.device("cuda")) == 1  # not 0
    assert _cuda.device_index(torch, torch.device("cuda", 0)) == 0
