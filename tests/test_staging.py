"""The CUDA staging pipeline driven through the host simulation of a device (separate
"device" allocations, copies run later on a stream thread, events), plus the CUDA entry
points' behaviour on a machine without CUDA."""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np
import pytest
import tensorfile
import torch
from tensorfile import CudaError, FormatError, _config, _cuda, _engine, _io
from tensorfile._reader import open_reader
from test_format_rules import Crafted

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _sim_clean():
    """Every test starts and ends with a quiet simulation and must leak nothing: no
    pinned buffer in use, no stream, event, stream thread or device allocation."""
    _engine._sim_configure(0, 0)
    _engine.staging_trim("sim")
    _engine._sim_reset_peak()
    yield
    _engine._sim_configure(0, 0)
    c = _engine._sim_counters()
    assert c["pinned_in_use"] == 0, c
    assert c["streams_live"] == 0, c
    assert c["events_live"] == 0, c
    assert c["threads_live"] == 0, c
    assert c["device_allocs_live"] == 0, c
    assert _engine.staging_trim("sim") == c["pinned_live"]
    assert _engine._sim_counters()["pinned_live"] == 0


class DeviceMemory:
    """Simulated device allocations, freed at the end of the test."""

    def __init__(self):
        self.ptrs: list[int] = []

    def alloc(self, nbytes: int, data: bytes | None = None) -> int:
        p = _engine._sim_alloc(nbytes)
        self.ptrs.append(p)
        if data:
            _engine._sim_write(p, data)
        return p

    def free(self):
        for p in self.ptrs:
            _engine._sim_free(p)
        self.ptrs.clear()


@pytest.fixture
def dev():
    mem = DeviceMemory()
    yield mem
    mem.free()


def write_file(path, nbytes: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def layout(sizes: list[int], gap: int = 4096) -> list[int]:
    """4096-aligned offsets for regions of `sizes`, each followed by padding."""
    offs, cursor = [], 0
    for n in sizes:
        offs.append(cursor)
        cursor += -(-max(n, 1) // gap) * gap
    return offs


def sim_read(fd, path, ptrs, sizes, offs, **kw):
    return _io.read_regions_to_device(fd, str(path), ptrs, sizes, offs, 0, backend="sim", **kw)


@pytest.fixture
def staging(monkeypatch):
    def set_(nbytes: int, buffers: int):
        monkeypatch.setenv("TENSORFILE_STAGING_NBYTES", str(nbytes))
        monkeypatch.setenv("TENSORFILE_STAGING_BUFFERS", str(buffers))

    return set_


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("nbytes, buffers", [(4096, 1), (65536, 2), (1 << 20, 4)])
def test_read_lands_every_byte_with_its_crc(tmp_path, dev, staging, threads, nbytes, buffers):
    staging(nbytes, buffers)
    sizes = [1, 100, 4096, 5000, 300_000, (1 << 20) + 7, 17, 0, 2 << 20]
    offs = layout(sizes)
    data = write_file(tmp_path / "f", offs[-1] + sizes[-1])
    ptrs = [dev.alloc(n) for n in sizes]
    _engine._sim_configure(0, 50)  # slow copies: a buffer reused too early corrupts data
    with open(tmp_path / "f", "rb") as f:
        crcs = sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, num_threads=threads)
    for p, o, n, c in zip(ptrs, offs, sizes, crcs.tolist()):
        got = _engine._sim_read(p, n)
        assert got == data[o : o + n]
        assert c == _engine.crc32c(got)
    peak = _engine._sim_counters()["pinned_peak"]
    assert 1 <= peak <= threads * buffers


def test_back_pressure_with_one_buffer(tmp_path, dev, staging):
    # One worker, one 4 KiB buffer, slow copies: every read must wait for the copy of
    # the previous one, and the data still lands intact and in order.
    staging(4096, 1)
    sizes = [64 << 10, 3, 4095, 40 << 10]
    offs = layout(sizes)
    data = write_file(tmp_path / "f", offs[-1] + sizes[-1], seed=1)
    ptrs = [dev.alloc(n) for n in sizes]
    _engine._sim_configure(0, 300)
    with open(tmp_path / "f", "rb") as f:
        sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, num_threads=1)
    for p, o, n in zip(ptrs, offs, sizes):
        assert _engine._sim_read(p, n) == data[o : o + n]
    c = _engine._sim_counters()
    assert c["pinned_peak"] == 1
    assert c["copies"] >= 16 + 10  # large regions go in buffer-sized pieces


def test_many_small_regions_share_staging_buffers(tmp_path, dev, staging):
    staging(1 << 20, 2)
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 600, size=3000).tolist()
    offs = layout(sizes, gap=1024)  # padding bridged inside one batch
    data = write_file(tmp_path / "f", offs[-1] + sizes[-1], seed=2)
    ptrs = [dev.alloc(n) for n in sizes]
    with open(tmp_path / "f", "rb") as f:
        crcs = sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, num_threads=2)
    for p, o, n, c in zip(ptrs, offs, sizes, crcs.tolist()):
        got = _engine._sim_read(p, n)
        assert got == data[o : o + n] and c == _engine.crc32c(got)
    c = _engine._sim_counters()
    assert c["copies"] == len(sizes)  # one copy per region, no more
    assert c["pinned_peak"] <= 4


def test_unsorted_regions_come_back_in_the_order_given(tmp_path, dev):
    sizes = [10, 20, 30, 40]
    offs = [12288, 0, 8192, 4096]
    data = write_file(tmp_path / "f", 16384, seed=3)
    ptrs = [dev.alloc(n) for n in sizes]
    with open(tmp_path / "f", "rb") as f:
        crcs = sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs)
    for p, o, n, c in zip(ptrs, offs, sizes, crcs.tolist()):
        assert c == _engine.crc32c(data[o : o + n])
        assert _engine._sim_read(p, n) == data[o : o + n]


def test_overlapping_regions_are_refused(tmp_path, dev):
    write_file(tmp_path / "f", 8192)
    ptrs = [dev.alloc(100), dev.alloc(100)]
    with open(tmp_path / "f", "rb") as f, pytest.raises(ValueError, match="overlap"):
        sim_read(f.fileno(), tmp_path / "f", ptrs, [100, 100], [0, 50])


def test_checksum_off_returns_zeros(tmp_path, dev):
    data = write_file(tmp_path / "f", 8192, seed=4)
    p = dev.alloc(5000)
    with open(tmp_path / "f", "rb") as f:
        crcs = sim_read(f.fileno(), tmp_path / "f", [p], [5000], [0], checksum=False)
    assert crcs.tolist() == [0]
    assert _engine._sim_read(p, 5000) == data[:5000]


def test_padding_must_be_zero(tmp_path, dev):
    raw = bytearray(12288)
    raw[:10] = b"x" * 10
    raw[4096:4106] = b"y" * 10
    raw[9000] = 1  # inside the padding after the second region
    (tmp_path / "f").write_bytes(bytes(raw))
    ptrs = [dev.alloc(10), dev.alloc(10)]
    zeros = _io.zero_ranges(np.array([0, 4096]), np.array([10, 10]), 0, 12288)
    assert zeros == [(10, 4086), (4106, 8182)]
    with open(tmp_path / "f", "rb") as f:
        with pytest.raises(FormatError, match=r"f: padding byte at offset 9000"):
            sim_read(f.fileno(), tmp_path / "f", ptrs, [10, 10], [0, 4096], zero_ranges=zeros)
        raw[9000] = 0
        (tmp_path / "f").write_bytes(bytes(raw))
        sim_read(f.fileno(), tmp_path / "f", ptrs, [10, 10], [0, 4096], zero_ranges=zeros)
    assert _engine._sim_read(ptrs[1], 10) == b"y" * 10


def test_a_real_file_through_the_simulation(tmp_path, dev):
    # A tensorfile file read the way load(map_location="cuda") reads it: every storage
    # into device memory, padding checked, checksums equal to the header's.
    obj = {
        "w": torch.randn(300, 70),
        "b": torch.arange(1000, dtype=torch.int16),
        "t": [torch.ones(3, dtype=torch.bfloat16), torch.zeros(0)],
        "big": torch.randn(700_000),
    }
    path = tmp_path / "m.tf"
    tensorfile.save(obj, path)
    reader = open_reader(str(path))
    try:
        lay = reader.layout
        sizes = lay.storage_nbytes.tolist()
        ptrs = [dev.alloc(n) for n in sizes]
        zeros = _io.zero_ranges(
            lay.storage_offsets, lay.storage_nbytes, int(lay.storage_offsets[0]), lay.file_nbytes
        )
        crcs = sim_read(
            reader.src.fd, path, ptrs, sizes, lay.storage_offsets, zero_ranges=zeros, num_threads=2
        )
        _io.check_storage_crcs(reader, list(range(len(sizes))), crcs)
        assert crcs.tolist() == lay.storage_crcs.tolist()
        raw = path.read_bytes()
        for p, o, n in zip(ptrs, lay.storage_offsets.tolist(), sizes):
            assert _engine._sim_read(p, n) == raw[o : o + n]
    finally:
        reader.close()


# --------------------------------------------------------------------------- save


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("nbytes, buffers", [(4096, 1), (65536, 3)])
def test_write_drains_device_memory_to_the_file(tmp_path, dev, staging, threads, nbytes, buffers):
    staging(nbytes, buffers)
    rng = np.random.default_rng(5)
    sizes = [5, 4096, 70_000, 1 << 20, 1, 3000]
    offs = layout(sizes)
    blobs = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]
    ptrs = [dev.alloc(n, b) for n, b in zip(sizes, blobs)]
    _engine._sim_configure(0, 50)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        crcs = _io.write_regions_from_device(
            fd, str(tmp_path / "out"), ptrs, sizes, offs, 0, num_threads=threads, backend="sim"
        )
    finally:
        os.close(fd)
    raw = (tmp_path / "out").read_bytes()
    cursor = 0
    for o, n, b, c in zip(offs, sizes, blobs, crcs.tolist()):
        assert raw[o : o + n] == b
        assert c == _engine.crc32c(b)
        assert not any(raw[cursor:o])  # bytes between regions read as zeros
        cursor = o + n
    assert _engine._sim_counters()["pinned_peak"] <= threads * buffers


def test_write_of_many_small_regions(tmp_path, dev, staging):
    staging(1 << 16, 2)
    rng = np.random.default_rng(6)
    sizes = rng.integers(1, 300, size=2000).tolist()
    offs = layout(sizes, gap=512)
    blobs = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]
    ptrs = [dev.alloc(n, b) for n, b in zip(sizes, blobs)]
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        crcs = _io.write_regions_from_device(
            fd, str(tmp_path / "out"), ptrs, sizes, offs, 0, num_threads=2, backend="sim"
        )
    finally:
        os.close(fd)
    raw = (tmp_path / "out").read_bytes()
    for o, n, b, c in zip(offs, sizes, blobs, crcs.tolist()):
        assert raw[o : o + n] == b and c == _engine.crc32c(b)


def test_write_checksums_the_staged_bytes_it_writes(tmp_path, dev, staging):
    # Device memory that changes during a save (a kernel still updating the tensor) gives
    # a torn file whose checksums hold: each CRC is of the staged bytes that were written,
    # never of the device memory read a second time.
    staging(65536, 2)
    sizes = [4 << 20] + [3000] * 20
    offs = layout(sizes)
    ptrs = [dev.alloc(n) for n in sizes]
    stop = threading.Event()
    passes = []

    def mutate():
        while not stop.is_set():
            fill = bytes([len(passes) % 251 + 1])
            for p, n in zip(ptrs, sizes):
                _engine._sim_write(p, fill * n)
            passes.append(1)

    _engine._sim_configure(0, 20)  # slow copies: the device memory changes between them
    thread = threading.Thread(target=mutate)
    thread.start()
    try:
        for _ in range(3):
            fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                crcs = _io.write_regions_from_device(
                    fd, str(tmp_path / "out"), ptrs, sizes, offs, 0, num_threads=2, backend="sim"
                )
            finally:
                os.close(fd)
            raw = (tmp_path / "out").read_bytes()
            wrong = [
                i
                for i, (o, n, c) in enumerate(zip(offs, sizes, crcs.tolist()))
                if _engine.crc32c(raw[o : o + n]) != c
            ]
            assert wrong == [], f"regions {wrong} were written with another checksum"
    finally:
        stop.set()
        thread.join()
    assert len(passes) > 3  # the memory did change during the writes


# --------------------------------------------------------------------------- errors


def test_copy_failure_on_load_raises_cuda_error_and_leaks_nothing(tmp_path, dev, staging):
    staging(4096, 2)
    sizes = [1 << 20, 1 << 20]
    offs = layout(sizes)
    write_file(tmp_path / "f", offs[-1] + sizes[-1])
    ptrs = [dev.alloc(n) for n in sizes]
    _engine._sim_configure(40, 20)  # the 40th of 512 copies faults
    with open(tmp_path / "f", "rb") as f, pytest.raises(CudaError) as e:
        sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, num_threads=3)
    # The engine's CUDA error maps to tensorfile.CudaError, carrying the call and the
    # runtime's name for the code.
    assert isinstance(e.value, RuntimeError)
    assert e.value.name == "cudaErrorSimulatedFault"
    assert e.value.call in ("cudaEventSynchronize", "cudaStreamSynchronize")
    assert "cudaErrorSimulatedFault" in str(e.value)
    assert _engine._sim_counters()["copies"] < 512


def test_copy_failure_on_save_raises_and_leaks_nothing(tmp_path, dev, staging):
    staging(4096, 3)
    ptrs = [dev.alloc(1 << 20)]
    _engine._sim_configure(5, 0)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(CudaError, match="cudaErrorSimulatedFault"):
            _io.write_regions_from_device(
                fd, str(tmp_path / "out"), ptrs, [1 << 20], [0], 0, num_threads=2, backend="sim"
            )
    finally:
        os.close(fd)


def test_read_failure_in_the_middle_raises_and_leaks_nothing(tmp_path, dev, staging):
    staging(65536, 2)
    sizes = [1 << 20] * 4
    offs = layout(sizes)
    write_file(tmp_path / "f", offs[2] + 1000)  # truncated inside the third region
    ptrs = [dev.alloc(n) for n in sizes]
    with (
        open(tmp_path / "f", "rb") as f,
        pytest.raises(FormatError, match="unexpected end of file"),
    ):
        sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, num_threads=3)


def test_read_error_from_the_system_names_the_file(tmp_path, dev):
    (tmp_path / "f").write_bytes(bytes(8192))
    p = dev.alloc(100)
    fd = os.open(tmp_path / "f", os.O_WRONLY)  # pread fails with EBADF
    try:
        with pytest.raises(OSError) as e:
            sim_read(fd, tmp_path / "f", [p], [100], [0])
    finally:
        os.close(fd)
    assert e.value.errno == errno.EBADF and str(tmp_path / "f") in str(e.value)


def test_write_failure_in_the_middle_raises_and_leaks_nothing(tmp_path, dev, staging):
    staging(4096, 2)
    ptrs = [dev.alloc(1 << 18)]
    _engine._inject_write_fault(7, errno.ENOSPC)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            _io.write_regions_from_device(
                fd, str(tmp_path / "out"), ptrs, [1 << 18], [0], 0, num_threads=2, backend="sim"
            )
    finally:
        os.close(fd)
        _engine._inject_write_fault(0, 0)
    assert e.value.errno == errno.ENOSPC


def test_staging_buffer_allocation_failure_leaks_nothing(tmp_path, dev):
    write_file(tmp_path / "f", 8192)
    p = dev.alloc(100)
    with open(tmp_path / "f", "rb") as f, pytest.raises(MemoryError):
        _engine.device_read_regions(
            backend="sim",
            device=0,
            fd=f.fileno(),
            ptrs=[p],
            nbytes=[100],
            file_offsets=[0],
            zero_offsets=[],
            zero_nbytes=[],
            num_threads=2,
            staging_nbytes=1 << 60,
            staging_buffers=2,
            checksum=True,
            path="f",
        )


def test_the_simulation_refuses_addresses_it_does_not_own(tmp_path, dev):
    # The simulated device faults on memory it did not allocate, as a device would: the
    # pipeline's success above is not an accident of shared address spaces.
    write_file(tmp_path / "f", 8192)
    host = np.zeros(100, dtype=np.uint8)
    with open(tmp_path / "f", "rb") as f, pytest.raises(ValueError, match="outside every device"):
        sim_read(f.fileno(), tmp_path / "f", [host.ctypes.data], [100], [0])


def test_unknown_backend_is_refused(tmp_path):
    write_file(tmp_path / "f", 4096)
    with (
        open(tmp_path / "f", "rb") as f,
        pytest.raises(ValueError, match="backend must be 'cuda' or 'sim', got 'tpu'"),
    ):
        _engine.device_read_regions(
            backend="tpu",
            device=0,
            fd=f.fileno(),
            ptrs=[],
            nbytes=[],
            file_offsets=[],
            zero_offsets=[],
            zero_nbytes=[],
            num_threads=1,
            staging_nbytes=4096,
            staging_buffers=1,
            checksum=True,
            path="f",
        )


# --------------------------------------------------------------------------- settings


def test_staging_settings(monkeypatch):
    monkeypatch.delenv("TENSORFILE_STAGING_NBYTES", raising=False)
    monkeypatch.delenv("TENSORFILE_STAGING_BUFFERS", raising=False)
    assert _config.staging_nbytes() == 16 << 20 and _config.staging_buffers() == 4
    monkeypatch.setenv("TENSORFILE_STAGING_NBYTES", "100")
    assert _config.staging_nbytes() == 4096
    monkeypatch.setenv("TENSORFILE_STAGING_BUFFERS", "0")
    with pytest.raises(ValueError, match="TENSORFILE_STAGING_BUFFERS"):
        _config.staging_buffers()


def test_gds_setting(monkeypatch):
    monkeypatch.delenv("TENSORFILE_GDS", raising=False)
    assert _config.gds() == "auto"
    for v in ("on", "OFF", "auto"):
        monkeypatch.setenv("TENSORFILE_GDS", v)
        assert _config.gds() == v.lower()
    monkeypatch.setenv("TENSORFILE_GDS", "yes")
    with pytest.raises(ValueError, match="TENSORFILE_GDS"):
        _config.gds()


def test_gds_modes_without_a_usable_cufile(tmp_path, caplog, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    monkeypatch.setattr(_cuda, "_cufile_state", False)  # as on a machine without libcufile
    monkeypatch.setattr(_cuda, "_NVIDIA_FS", str(path))  # as if the driver were loaded
    assert _cuda._gds_open(str(path), False, "off") == -1
    with caplog.at_level(logging.DEBUG, logger="tensorfile"):
        assert _cuda._gds_open(str(path), False, "auto") == -1
    assert "GPUDirect Storage not used" in caplog.text
    with pytest.raises(RuntimeError, match=r"TENSORFILE_GDS=on.*cuFile is unavailable"):
        _cuda._gds_open(str(path), False, "on")


def test_gds_auto_needs_the_nvidia_fs_driver(tmp_path, caplog, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    monkeypatch.setattr(_cuda, "_NVIDIA_FS", str(tmp_path / "no-such-driver"))
    monkeypatch.setattr(_cuda, "_cufile_state", True)  # even with libcufile loaded
    with caplog.at_level(logging.DEBUG, logger="tensorfile"):
        assert _cuda._gds_open(str(path), False, "auto") == -1
    assert "nvidia-fs" in caplog.text


# --------------------------------------------------------------------------- no CUDA here

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@no_cuda
def test_cuda_available_says_no_without_raising():
    assert tensorfile.cuda_available() is False
    assert isinstance(_engine.cuda_error(), str)


@no_cuda
def test_map_location_cuda_without_cuda_is_a_clear_error(tmp_path):
    tensorfile.save({"w": torch.ones(3)}, tmp_path / "m.tf")
    with pytest.raises(RuntimeError, match=r"m\.tf: .*CUDA is not available.*map_location"):
        tensorfile.load(tmp_path / "m.tf", map_location="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        with tensorfile.open(tmp_path / "m.tf") as f:
            f.get("w", map_location="cuda:0")


@no_cuda
def test_saved_on_cuda_loads_on_cpu_only_with_map_location(tmp_path):
    two = Crafted(tmp_path / "two.tf", {"a": torch.arange(3, dtype=torch.int32)})
    h = two.edited()
    h["storages"][0][2] = "cuda:0"
    two.write(h)
    with pytest.raises(RuntimeError, match=r"meant for cuda:0.*map_location"):
        tensorfile.load(two.path)
    out = tensorfile.load(two.path, map_location={"cuda:0": "cpu"})
    assert torch.equal(out["a"], torch.arange(3, dtype=torch.int32))
    out = tensorfile.load(two.path, map_location=lambda s, loc: s)
    assert torch.equal(out["a"], torch.arange(3, dtype=torch.int32))


@no_cuda
def test_pin_memory_without_cuda_is_a_clear_error(tmp_path):
    tensorfile.save({"w": torch.ones(3)}, tmp_path / "m.tf")
    with pytest.raises(RuntimeError, match="pin_memory=True needs CUDA"):
        tensorfile.load(tmp_path / "m.tf", pin_memory=True)
    with pytest.raises(ValueError, match="mmap"):
        tensorfile.load(tmp_path / "m.tf", pin_memory=True, mmap=True)


def test_pinned_buffers_are_cached_and_replaced_when_the_size_changes(tmp_path, dev, staging):
    write_file(tmp_path / "f", 1 << 16)
    p = dev.alloc(1 << 16)
    with open(tmp_path / "f", "rb") as f:
        staging(8192, 3)
        sim_read(f.fileno(), tmp_path / "f", [p], [1 << 16], [0], num_threads=1)
        assert _engine._sim_counters()["pinned_live"] == 3  # kept for the next call
        sim_read(f.fileno(), tmp_path / "f", [p], [1 << 16], [0], num_threads=1)
        assert _engine._sim_counters()["pinned_live"] == 3  # reused, not pinned again
        staging(16384, 2)
        sim_read(f.fileno(), tmp_path / "f", [p], [1 << 16], [0], num_threads=1)
        assert _engine._sim_counters()["pinned_live"] == 2  # the 8 KiB ones were freed


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_gds_refused_file_falls_back_only_in_auto(tmp_path, monkeypatch, mode):
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    monkeypatch.setenv("TENSORFILE_GDS", mode)
    monkeypatch.setattr(_cuda, "_gds_open", lambda p, write, m, name="": os.open(p, os.O_RDONLY))
    calls = []

    def call(gds_fd):
        calls.append(gds_fd)
        if gds_fd >= 0:
            raise CudaError("cuFileHandleRegister failed", "cuFileHandleRegister", "CU_FILE_X")
        return np.zeros(1, dtype=np.uint32)

    if mode == "on":
        with pytest.raises(CudaError, match="cuFileHandleRegister"):
            _cuda.transfer(False, str(path), str(path), call)
        assert len(calls) == 1
    else:
        assert _cuda.transfer(False, str(path), str(path), call).tolist() == [0]
        assert calls[0] >= 0 and calls[1] == -1


def test_gds_errors_other_than_a_refused_file_are_raised_in_auto(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    monkeypatch.setenv("TENSORFILE_GDS", "auto")
    monkeypatch.setattr(_cuda, "_gds_open", lambda p, write, m, name="": os.open(p, os.O_RDONLY))

    def call(gds_fd):
        raise CudaError("cuFileRead failed", "cuFileRead", "CU_FILE_IO_NOT_SUPPORTED")

    with pytest.raises(CudaError, match="cuFileRead"):
        _cuda.transfer(False, str(path), str(path), call)


def test_zip_crc32_for_torch_save_files(tmp_path, dev, staging):
    # torch.save zips carry zip's CRC-32, not CRC32C; pieces fold with its own combine.
    import zlib

    staging(4096, 2)
    sizes = [10_000, 3, 70_000]
    offs = [0, 12288, 16384]
    data = write_file(tmp_path / "f", 90_000, seed=7)
    ptrs = [dev.alloc(n) for n in sizes]
    with open(tmp_path / "f", "rb") as f:
        crcs = sim_read(f.fileno(), tmp_path / "f", ptrs, sizes, offs, zip_crc=True, num_threads=2)
    assert crcs.tolist() == [zlib.crc32(data[o : o + n]) for o, n in zip(offs, sizes)]
