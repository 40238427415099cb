"""The real CUDA code path (the dlopen shim, the function table, the CUDA device and its
error mapping) driven on any machine through a stand-in libcudart built from
tests/data/fake_cudart.c, in a child process since a process opens libcudart once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tensorfile import _engine

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import ctypes, json, os, sys
import numpy as np
from tensorfile import _engine

lib, path, mode, device, cufile = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
current = int(sys.argv[6])
out = {"loaded": _engine.cuda_load(lib)}
fake = ctypes.CDLL(lib)
for name in ("fake_live", "fake_spins", "fake_pageable_copies", "fake_contexts_created"):
    getattr(fake, name).restype = ctypes.c_long
if current >= 0:
    fake.cudaSetDevice(current)  # the caller has used this device
gds = -1
if cufile:
    out["cufile"] = _engine.cufile_load(cufile)
    out["cufile_error"] = _engine.cufile_error()
    fake_cufile = ctypes.CDLL(cufile)
    for name in ("live", "reads", "registered", "registrations", "direct"):
        getattr(fake_cufile, "fake_cufile_" + name).restype = ctypes.c_long
out["available"] = _engine.cuda_available()
out["library"] = _engine.cuda_library()
data = open(path, "rb").read()
sizes = [100, 5000, 3 << 20, 7]
offs = [0, 4096, 12288, (3 << 20) + 16384]
try:
    if mode == "read":
        dst = [np.zeros(n, np.uint8) for n in sizes]
        fd = os.open(path, os.O_RDONLY)
        gds = os.open(path, os.O_RDONLY) if cufile else -1
        try:
            crcs = _engine.device_read_regions(
                backend="cuda", device=device, fd=fd, ptrs=[d.ctypes.data for d in dst], nbytes=sizes,
                file_offsets=offs, zero_offsets=[100, 9096], zero_nbytes=[3996, 3192], num_threads=3,
                staging_nbytes=1 << 20, staging_buffers=2, checksum=True, path=path, gds_fd=gds)
        finally:
            os.close(fd)
        out["same"] = all(d.tobytes() == data[o:o + n] for d, o, n in zip(dst, offs, sizes))
    else:
        src = [np.frombuffer(data[o:o + n], np.uint8).copy() for o, n in zip(offs, sizes)]
        target = path + ".out"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        gds = os.open(target, os.O_WRONLY) if cufile else -1
        try:
            crcs = _engine.device_write_regions(
                backend="cuda", device=device, fd=fd, ptrs=[s.ctypes.data for s in src], nbytes=sizes,
                file_offsets=offs, num_threads=3, staging_nbytes=1 << 20, staging_buffers=2, checksum=True,
                path=path, gds_fd=gds)
        finally:
            os.close(fd)
        written = open(target, "rb").read()
        out["same"] = all(written[o:o + n] == data[o:o + n] for o, n in zip(offs, sizes))
    out["crcs_ok"] = [int(c) for c in crcs] == [_engine.crc32c(data[o:o + n]) for o, n in zip(offs, sizes)]
except Exception as e:
    out["exc"] = type(e).__module__ + "." + type(e).__name__
    out["msg"] = str(e)
    out["call"] = getattr(e, "call", None)
    out["name"] = getattr(e, "name", None)
if gds >= 0:
    os.close(gds)
    out["cufile_live"] = fake_cufile.fake_cufile_live()
    out["cufile_reads"] = fake_cufile.fake_cufile_reads()
    out["cufile_registered"] = fake_cufile.fake_cufile_registered()
    out["cufile_registrations"] = fake_cufile.fake_cufile_registrations()
    out["cufile_direct"] = fake_cufile.fake_cufile_direct()
out["current_after"] = fake.fake_current_device()
out["contexts"] = [fake.fake_contexts_created(d) for d in range(2)]
out["spins"] = fake.fake_spins()
out["pageable"] = fake.fake_pageable_copies()
out["trimmed"] = _engine.staging_trim("cuda", device) if out["available"] and device < 2 else 0
out["live"] = fake.fake_live()
print("RESULT " + json.dumps(out))
"""


def build(tmp_path_factory, source: str, name: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build the stand-in libraries")
    lib = str(tmp_path_factory.mktemp("fake") / name)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", lib, os.path.join(HERE, "data", source)], check=True
    )
    return lib


@pytest.fixture(scope="module")
def fake_cudart(tmp_path_factory):
    return build(tmp_path_factory, "fake_cudart.c", "libcudart.so.99")


@pytest.fixture(scope="module")
def fake_cufile(tmp_path_factory):
    return build(tmp_path_factory, "fake_cufile.c", "libcufile.so.0")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "f.bin"
    raw = bytearray(np.random.default_rng(0).integers(0, 256, (3 << 20) + 20480, dtype=np.uint8))
    raw[100:4096] = bytes(3996)  # the zero ranges checked on read
    raw[9096:12288] = bytes(3192)
    path.write_bytes(bytes(raw))
    return str(path)


def child(
    lib: str,
    path: str,
    mode: str,
    device: int = 1,
    cufile: str = "",
    current: int = -1,
    cwd: str | None = None,
    **env: str,
) -> dict:
    """Runs CHILD; `current` >= 0 makes that device current (and used) on the calling
    thread first."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, lib, path, mode, str(device), cufile, str(current)],
        cwd=cwd or os.path.dirname(path),  # where the stand-in cuFile may leave its log
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("mode", ["read", "write"])
def test_transfers_through_the_cuda_device(fake_cudart, data_file, mode):
    out = child(fake_cudart, data_file, mode)
    assert out["loaded"] and out["available"] and out["library"] == fake_cudart
    assert "exc" not in out, out
    assert out["same"] and out["crcs_ok"]
    # The calling thread had not used device 0: putting it back would have created a
    # context there, so a thread that ran a lane stays on device 1 (as torch's device
    # guard does; 0 when pool threads took every lane), and no pool thread created one.
    assert out["contexts"] == [0, 1]
    assert out["current_after"] in (0, 1)
    assert out["spins"] == 0  # every wait blocked on a blocking-sync event
    assert out["pageable"] == 0  # every copy's host side was pinned
    # Cached after the call: 2 buffers per lane, at most 3 lanes at once. A lane that
    # opens while another is returning its buffers takes what is cached and allocates the
    # rest, so any count from one lane's 2 to 3 lanes' 6 is possible, never more.
    assert 2 <= out["trimmed"] <= 6
    assert out["live"] == 0  # every buffer, stream and event released


@pytest.mark.parametrize("mode", ["read", "write"])
def test_an_asynchronous_copy_fault_maps_to_cuda_error(fake_cudart, data_file, mode):
    out = child(fake_cudart, data_file, mode, FAKE_CUDART_FAIL_COPY="2")
    assert out["exc"] == "tensorfile._errors.CudaError", out
    assert out["name"] == "cudaErrorIllegalAddress"
    assert out["call"] in ("cudaEventSynchronize", "cudaStreamSynchronize")
    assert "illegal memory access" in out["msg"]
    assert out["contexts"] == [0, 1] and out["spins"] == 0 and out["live"] == 0


def test_a_failed_pinned_allocation_leaks_nothing(fake_cudart, data_file):
    out = child(fake_cudart, data_file, "read", FAKE_CUDART_FAIL_HOSTALLOC="1")
    assert out["exc"] == "tensorfile._errors.CudaError", out
    assert (out["call"], out["name"]) == ("cudaHostAlloc", "cudaErrorMemoryAllocation")
    assert out["live"] == 0


@pytest.mark.parametrize("mode", ["read", "write"])
def test_a_caller_on_the_target_device_creates_no_other_context(fake_cudart, data_file, mode):
    out = child(fake_cudart, data_file, mode, device=1, current=1)
    assert "exc" not in out and out["same"], out
    assert out["contexts"] == [0, 1] and out["current_after"] == 1 and out["spins"] == 0


@pytest.mark.parametrize("mode", ["read", "write"])
def test_a_caller_that_used_another_device_gets_it_back(fake_cudart, data_file, mode):
    out = child(fake_cudart, data_file, mode, device=1, current=0)
    assert "exc" not in out and out["same"], out
    assert out["current_after"] == 0  # its context exists: restoring creates nothing
    assert out["contexts"] == [1, 1] and out["spins"] == 0


def test_a_missing_device_is_a_cuda_error(fake_cudart, data_file):
    out = child(fake_cudart, data_file, "read", device=5)
    assert (out["call"], out["name"]) == ("cudaSetDevice", "cudaErrorInvalidDevice"), out
    assert out["live"] == 0


@pytest.mark.parametrize("mode", ["read", "write"])
def test_gpudirect_path_through_cufile(fake_cudart, fake_cufile, data_file, mode):
    out = child(fake_cudart, data_file, mode, cufile=fake_cufile)
    assert out["cufile"] is True and "exc" not in out, out
    assert out["same"] and out["crcs_ok"]  # checksums still come from staged bytes
    assert out["cufile_live"] == 0 and out["live"] == 0  # the file handle is deregistered
    if mode == "read":
        assert out["cufile_reads"] >= (3 << 20) // 300000  # short transfers were continued
    # The 3 MiB region is registered for the transfer (the small ones are not) and
    # deregistered after it.
    assert out["cufile_registrations"] == 1 and out["cufile_registered"] == 0
    assert out["cufile_direct"] >= (3 << 20) // 300000
    assert out["spins"] == 0 and out["contexts"] == [0, 1]


def test_gpudirect_registration_can_be_turned_off(fake_cudart, fake_cufile, data_file):
    out = child(fake_cudart, data_file, "read", cufile=fake_cufile, TENSORFILE_GDS_REGISTER="0")
    assert "exc" not in out and out["same"], out
    assert out["cufile_registrations"] == 0 and out["cufile_direct"] == 0


def test_the_cufile_log_stays_out_of_the_working_directory(
    fake_cudart, fake_cufile, data_file, tmp_path
):
    # The engine leaves CUFILE_LOGFILE_PATH to the Python side (see test_cuda_finding.py);
    # the stand-in writes where the real library does, so this shows the model works.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "elsewhere.log"
    out = child(
        fake_cudart,
        data_file,
        "read",
        cufile=fake_cufile,
        cwd=str(cwd),
        CUFILE_LOGFILE_PATH=str(log),
    )
    assert out["cufile"] is True, out
    assert os.listdir(cwd) == [] and log.exists()


def test_a_driver_open_error_has_its_header_name(fake_cudart, fake_cufile, data_file):
    out = child(fake_cudart, data_file, "read", cufile=fake_cufile, FAKE_CUFILE_OPEN_ERROR="5033")
    assert out["cufile"] is False
    assert "CU_FILE_NVFS_SETUP_ERROR" in out["cufile_error"], out


def test_a_failed_cufile_read_names_the_error_and_the_file(fake_cudart, fake_cufile, data_file):
    out = child(fake_cudart, data_file, "read", cufile=fake_cufile, FAKE_CUFILE_FAIL_READ="3")
    assert out["exc"] == "tensorfile._errors.CudaError", out
    assert (out["call"], out["name"]) == ("cuFileRead", "CU_FILE_IO_NOT_SUPPORTED")
    assert data_file in out["msg"]
    assert out["cufile_live"] == 0 and out["live"] == 0
    assert (
        out["cufile_registrations"] == 1 and out["cufile_registered"] == 0
    )  # deregistered on the error path


def test_a_refused_file_is_a_register_error(fake_cudart, fake_cufile, data_file):
    # The Python side falls back to staging on exactly this error in TENSORFILE_GDS=auto.
    out = child(fake_cudart, data_file, "read", cufile=fake_cufile, FAKE_CUFILE_FAIL_REGISTER="1")
    assert (out["call"], out["name"]) == ("cuFileHandleRegister", "CU_FILE_INVALID_FILE_TYPE"), out
    assert out["cufile_live"] == 0 and out["live"] == 0


def test_an_unloadable_runtime_is_reported_and_not_kept(tmp_path, fake_cudart):
    # A failure is not remembered: a runtime that turns up later (torch loads one, or
    # the wheels' copy is found) is still used.
    bogus = tmp_path / "libcudart.so.0"
    bogus.write_bytes(b"not a library")
    code = (
        "from tensorfile import _engine\n"
        f"print('RESULT', _engine.cuda_load({str(bogus)!r}))\n"
        f"print('RESULT', _engine.cuda_load({fake_cudart!r}), _engine.cuda_library(), "
        "_engine.cuda_available(), repr(_engine.cuda_error()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines == ["RESULT False", f"RESULT True {fake_cudart} True ''"], (
        proc.stdout + proc.stderr
    )


def test_without_any_runtime_a_transfer_is_a_cuda_error(tmp_path):
    bogus = tmp_path / "libcudart.so.0"
    bogus.write_bytes(b"not a library")
    code = (
        "from tensorfile import _engine\n"
        f"_engine.cuda_load({str(bogus)!r})\n"
        "try:\n"
        "    _engine.device_read_regions(backend='cuda', device=0, fd=0, ptrs=[1], nbytes=[1], "
        "file_offsets=[0], zero_offsets=[], zero_nbytes=[], num_threads=1, staging_nbytes=4096, "
        "staging_buffers=1, checksum=True, path='f')\n"
        "except Exception as e:\n"
        "    print('RESULT', type(e).__name__, e.name)\n"
        "print('LOADED', _engine.cuda_library())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if "LOADED /" in proc.stdout:
        pytest.skip("the system's loader finds a libcudart here")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines == ["RESULT CudaError cudaErrorLibraryNotFound"], proc.stdout + proc.stderr


def test_engine_in_this_process_never_raises_on_availability():
    # Available exactly when nothing stood in the way; otherwise the reason is given.
    available, why = _engine.cuda_available(), _engine.cuda_error()
    assert available is (why == ""), (available, why)
