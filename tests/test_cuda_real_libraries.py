"""The shims against the real CUDA runtime and cuFile of this machine, where present
(skipped elsewhere): every symbol they bind resolves, the runtime answers "no device"
without hanging, and the cuFile error names are cufile.h's.

cufile.h and libcufile are looked for in the nvidia-cufile wheel layout on sys.path, the
CUDA toolkits under /usr/local, and $TENSORFILE_CUFILE_ROOT (a directory holding that
wheel layout, e.g. an unpacked wheel)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "csrc", "shim"))
import gen_cufile_errors  # noqa: E402

sys.path.pop(0)


def _source(name: str) -> str:
    with open(os.path.join(ROOT, "csrc", "shim", name)) as f:
        return f.read()


def _bound(source: str) -> list[str]:
    """The symbol names a shim binds with bind(h, "name", ...)."""
    return re.findall(r'bind\(h, "(\w+)"', source)


def _roots() -> list[str]:
    out = [p for p in sys.path if p]
    if os.environ.get("TENSORFILE_CUFILE_ROOT"):
        out.insert(0, os.environ["TENSORFILE_CUFILE_ROOT"])
    return out


def _first(patterns: list[str]) -> str | None:
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _cudart() -> str | None:
    pats = [
        os.path.join(r, "nvidia", sub, "lib", "libcudart.so.1[23]")
        for r in _roots()
        for sub in ("cu13", "cuda_runtime")
    ]
    return _first(
        [
            *pats,
            "/usr/local/cuda*/lib64/libcudart.so.1[23]",
            "/usr/local/cuda*/lib/libcudart.so.1[23]",
        ]
    )


def _cufile(name: str) -> str | None:
    pats = [
        os.path.join(r, "nvidia", sub, d, name)
        for r in _roots()
        for sub in ("cu13", "cufile", "cu12")
        for d in ("lib", "include")
    ]
    return _first(
        pats
        + [f"/usr/local/cuda*/targets/*/{d}/{name}" for d in ("lib", "include")]
        + [f"/usr/local/cuda*/{d}/{name}" for d in ("lib64", "include")]
    )


def test_the_error_table_has_the_values_of_cufile_h():
    # These were wrong once; they hold whether or not a header is installed here.
    table = dict(re.findall(r"TF_CUFILE_ERROR\((\d+), (\w+)\)", _source("cufile_errors.inc")))
    assert table["5026"] == "CU_FILE_DRIVER_ALREADY_OPEN"
    assert table["5019"] == "CU_FILE_INVALID_FILE_OPEN_FLAG"
    assert table["5030"] == "CU_FILE_INTERNAL_ERROR"
    assert table["5018"] == "CU_FILE_INVALID_FILE_TYPE"
    assert table["5033"] == "CU_FILE_NVFS_SETUP_ERROR"


def test_the_error_table_matches_the_installed_header():
    header = _cufile("cufile.h")
    if header is None:
        pytest.skip("no cufile.h here (the nvidia-cufile wheel or a CUDA toolkit has one)")
    with open(header) as f:
        want = gen_cufile_errors.entries(f.read())
    got = [
        (int(c), n)
        for c, n in re.findall(r"TF_CUFILE_ERROR\((\d+), (\w+)\)", _source("cufile_errors.inc"))
    ]
    assert len(want) > 40
    # A newer header may add codes; every code the table names must mean the same there.
    assert set(got) <= set(want), sorted(set(got) - set(want))
    assert got == want  # regenerate with csrc/shim/gen_cufile_errors.py for a newer header


SYMBOLS = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
missing = [n for n in sys.argv[2:] if not hasattr(lib, n)]
print("MISSING", " ".join(missing))
"""


def test_every_cudart_symbol_resolves():
    lib = _cudart()
    if lib is None:
        pytest.skip("no libcudart here")
    names = _bound(_source("cuda.cpp"))
    assert "cudaEventCreateWithFlags" in names and len(names) >= 14
    proc = subprocess.run(
        [sys.executable, "-c", SYMBOLS, lib, *names], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "MISSING", proc.stdout + proc.stderr


def test_every_cufile_symbol_resolves():
    lib = _cufile("libcufile.so.0")
    if lib is None:
        pytest.skip("no libcufile here")
    names = _bound(_source("cufile.cpp"))
    assert "cuFileBufRegister" in names
    proc = subprocess.run(
        [sys.executable, "-c", SYMBOLS, lib, *names], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "MISSING", proc.stdout + proc.stderr


NO_DEVICE = r"""
import os, sys
from tensorfile import _engine
import tensorfile
loaded = _engine.cuda_load(sys.argv[1])
real = os.path.realpath(_engine.cuda_library()) == os.path.realpath(sys.argv[1])
print("RESULT", loaded, real or _engine.cuda_library(),
      _engine.cuda_available(), tensorfile.cuda_available(), bool(_engine.cuda_error()))
"""


def test_the_real_runtime_says_no_device_without_hanging():
    lib = _cudart()
    if lib is None:
        pytest.skip("no libcudart here")
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, "-c", NO_DEVICE, lib],
        capture_output=True,
        text=True,
        timeout=60,  # the answer takes well under a second; a hang fails here
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines == ["RESULT True True False False True"], proc.stdout + proc.stderr
