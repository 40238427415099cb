"""The native engine: CRC32C, parallel region writes and reads, and its error mapping."""

from __future__ import annotations

import errno
import os
import platform
import random
import re

import numpy as np
import pytest
from _util import crc32c_py
from tensorfile import FormatError, _engine

# --------------------------------------------------------------------------- crc32c


@pytest.mark.parametrize(
    "data, crc",
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (b"a", 0xC1D04330),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data, crc):
    assert _engine.crc32c(data) == crc
    assert _engine.crc32c(data, software=True) == crc
    assert crc32c_py(data) == crc


def _cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (x86-64 Linux), else skip."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("reads the x86 feature flags of /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo")


def test_crc32c_reports_hardware_support():
    # The SSE4.2 crc32 instruction is what the hardware path uses.
    assert _engine.crc32c_hardware() is ("sse4_2" in _cpu_flags())


def test_crc32_zip_reports_hardware_support():
    # Carry-less multiplication folds the zip CRC; SSE4.1 extracts the result.
    flags = _cpu_flags()
    assert _engine.crc32_zip_hardware() is ("pclmulqdq" in flags and "sse4_1" in flags)


def test_crc32c_hardware_equals_software():
    rng = np.random.default_rng(0)
    backing = rng.integers(0, 256, size=70_000, dtype=np.uint8).tobytes()
    view = memoryview(backing)
    lengths = [*range(0, 130), 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, 65_537]
    for misalign in range(16):
        for n in lengths:
            chunk = view[misalign : misalign + n]
            hw = _engine.crc32c(chunk)
            sw = _engine.crc32c(chunk, software=True)
            assert hw == sw, (misalign, n)
            if n <= 300:
                assert hw == crc32c_py(bytes(chunk)), (misalign, n)


def test_crc32c_continues_from_a_previous_value():
    data = bytes(range(256)) * 7
    for cut in (0, 1, 7, 255, 1000, len(data)):
        head = _engine.crc32c(data[:cut])
        assert _engine.crc32c(data[cut:], head) == _engine.crc32c(data)
        assert _engine.crc32c(data[cut:], head, software=True) == _engine.crc32c(data)


def test_crc32c_combine():
    rng = random.Random(1)
    for _ in range(60):
        a = rng.randbytes(rng.choice([0, 1, 3, 64, 1000, 5000]))
        b = rng.randbytes(rng.choice([0, 1, 5, 17, 4096, 70_000]))
        got = _engine.crc32c_combine(_engine.crc32c(a), _engine.crc32c(b), len(b))
        assert got == _engine.crc32c(a + b)


def test_crc32c_of_buffers():
    a = np.arange(1000, dtype=np.uint32)
    assert _engine.crc32c(a) == _engine.crc32c(a.tobytes())
    assert _engine.crc32c(bytearray(b"xyz")) == _engine.crc32c(b"xyz")
    assert _engine.crc32c(memoryview(b"xyz")) == _engine.crc32c(b"xyz")


@pytest.mark.parametrize("step", [2, -1, -3])
def test_crc32c_never_silently_wrong_on_strided_buffers(step):
    # A strided buffer is either checksummed by its elements or refused; never
    # checksummed as the raw memory span its pointer starts (or worse, ends) at.
    a = np.arange(64, dtype=np.uint8)[::step]
    try:
        got = _engine.crc32c(a)
    except (BufferError, TypeError, ValueError):
        return
    assert got == crc32c_py(a.tobytes())


# --------------------------------------------------------------------------- regions


def _random_regions(seed, count, big=()):
    """Buffers of random bytes and sorted, non-overlapping file offsets with gaps shorter
    than 4096 bytes, as in a tensorfile (the first region may start anywhere)."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(0, 5000)) for _ in range(count)]
    sizes[::17] = [0] * len(sizes[::17])  # some empty regions
    for i, n in big:
        sizes.insert(i, n)
    bufs = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    offsets = []
    cursor = int(rng.integers(0, 5000))
    for n in sizes:
        cursor += int(rng.choice([0, 1, 7, 4095, int(rng.integers(0, 4096))]))
        offsets.append(cursor)
        cursor += n
    return bufs, np.array(offsets, dtype=np.uint64), cursor


def _arrays(bufs):
    ptrs = np.array([b.ctypes.data for b in bufs], dtype=np.uint64)
    nbytes = np.array([b.size for b in bufs], dtype=np.uint64)
    return ptrs, nbytes


BIG = ((5, 1 << 20), (40, (3 << 20) + 7), (41, 300_001), (200, 256 << 10))


@pytest.mark.parametrize("writeback", [False, True])  # True: a durable save's early writeback
@pytest.mark.parametrize("threads, task", [(1, 1 << 20), (2, 4096), (4, 65536), (3, 8 << 20)])
def test_write_then_read_regions(tmp_path, threads, task, writeback):
    bufs, offsets, end = _random_regions(threads * 31 + task % 97, 300, BIG)
    ptrs, nbytes = _arrays(bufs)
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        crcs = _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=threads,
            task_nbytes=task,
            checksum=True,
            path=path,
            writeback=writeback,
        )
        assert crcs.dtype == np.uint32 and len(crcs) == len(bufs)
        for b, c in zip(bufs, crcs):
            assert int(c) == _engine.crc32c(b.tobytes())
        # the file holds every region at its offset, zeros elsewhere
        raw = np.fromfile(path, dtype=np.uint8)
        assert raw.size == end
        mask = np.zeros(end, dtype=bool)
        for b, off in zip(bufs, offsets):
            o = int(off)
            assert np.array_equal(raw[o : o + b.size], b)
            mask[o : o + b.size] = True
        assert not raw[~mask].any()

        # read back into fresh memory, with checksums and gap checks
        outs = [np.full(b.size, 0xAA, dtype=np.uint8) for b in bufs]
        optrs, _ = _arrays(outs)
        got = _engine.read_regions(
            fd=fd,
            ptrs=optrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=threads,
            task_nbytes=task,
            checksum=True,
            check_gaps=True,
            gap_begin=int(offsets[0]),
            gap_end=end,
            path=path,
        )
        assert np.array_equal(got, crcs)
        for b, o in zip(bufs, outs):
            assert np.array_equal(b, o)
        # without checksums the bytes still arrive; the checksums are then zero
        outs2 = [np.empty(b.size, dtype=np.uint8) for b in bufs]
        optrs2, _ = _arrays(outs2)
        got2 = _engine.read_regions(
            fd=fd,
            ptrs=optrs2,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=threads,
            task_nbytes=task,
            checksum=False,
            check_gaps=False,
            gap_begin=0,
            gap_end=0,
            path=path,
        )
        assert not got2.any()
        for b, o in zip(bufs, outs2):
            assert np.array_equal(b, o)
    finally:
        os.close(fd)


@pytest.mark.parametrize("task", [4096, 1 << 20])
@pytest.mark.parametrize("misalign", [0, 1, 3, 7])
def test_write_regions_checksum_what_they_copy_at_any_alignment(tmp_path, task, misalign):
    # A checksummed write copies each task's bytes into its own buffer, checksumming as it
    # copies (an unaligned head, three interleaved lanes of 8 KiB, a tail): every length
    # and alignment must give the file the bytes and the caller their CRC32C.
    rng = np.random.default_rng(misalign)
    backing = rng.integers(0, 256, size=(3 << 20) + 64, dtype=np.uint8)
    lengths = [1, 7, 8, 9, 4095, 24575, 24576, 24577, 3 * 24576 + 13, 300_001, 1 << 20]
    ptrs, offsets, cursor, at = [], [], 5, misalign
    for n in lengths:
        ptrs.append(backing.ctypes.data + at)
        offsets.append(cursor)
        at += n + 1
        cursor += n + int(rng.integers(0, 4096))
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        crcs = _engine.write_regions(
            fd=fd,
            ptrs=np.array(ptrs, np.uint64),
            nbytes=np.array(lengths, np.uint64),
            file_offsets=np.array(offsets, np.uint64),
            num_threads=2,
            task_nbytes=task,
            checksum=True,
            path=path,
        )
    finally:
        os.close(fd)
    raw = np.fromfile(path, dtype=np.uint8)
    for p, n, o, c in zip(ptrs, lengths, offsets, crcs.tolist()):
        want = backing[p - backing.ctypes.data :][:n]
        assert np.array_equal(raw[o : o + n], want), (n, o)
        assert c == _engine.crc32c(want.tobytes()), n


@pytest.mark.parametrize("gap", [4095, 4096, 6000])
def test_write_regions_fills_any_gap_with_zeros(tmp_path, gap):
    # Two small regions gathered into one vectored write: the bytes between them must be
    # zeros, however far apart they are.
    a = np.full(10, 7, np.uint8)
    b = np.full(10, 9, np.uint8)
    ptrs, nbytes = _arrays([a, b])
    offsets = np.array([0, 10 + gap], dtype=np.uint64)
    path = str(tmp_path / "gap.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=1,
            task_nbytes=1 << 20,
            checksum=True,
            path=path,
        )
    finally:
        os.close(fd)
    raw = np.fromfile(path, dtype=np.uint8)
    assert raw.size == 20 + gap
    assert (raw[:10] == 7).all() and (raw[-10:] == 9).all()
    nonzero = np.flatnonzero(raw[10:-10])
    assert nonzero.size == 0, f"gap bytes at {(nonzero[:5] + 10).tolist()} are not zero"


def test_write_regions_without_checksums(tmp_path):
    bufs, offsets, _ = _random_regions(5, 20)
    ptrs, nbytes = _arrays(bufs)
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        crcs = _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=2,
            task_nbytes=4096,
            checksum=False,
            path=path,
        )
        assert len(crcs) == len(bufs) and not crcs.any()
    finally:
        os.close(fd)


def test_checksum_regions():
    bufs, _, _ = _random_regions(9, 100, ((3, 1 << 20), (50, 300_000)))
    ptrs, nbytes = _arrays(bufs)
    for threads, task in ((1, 4096), (4, 65536)):
        crcs = _engine.checksum_regions(
            ptrs=ptrs, nbytes=nbytes, num_threads=threads, task_nbytes=task
        )
        assert [int(c) for c in crcs] == [_engine.crc32c(b.tobytes()) for b in bufs]


def test_no_regions(tmp_path):
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    empty = np.zeros(0, dtype=np.uint64)
    try:
        assert (
            len(
                _engine.write_regions(
                    fd=fd,
                    ptrs=empty,
                    nbytes=empty,
                    file_offsets=empty,
                    num_threads=2,
                    task_nbytes=4096,
                    checksum=True,
                    path=path,
                )
            )
            == 0
        )
        assert (
            len(
                _engine.read_regions(
                    fd=fd,
                    ptrs=empty,
                    nbytes=empty,
                    file_offsets=empty,
                    num_threads=2,
                    task_nbytes=4096,
                    checksum=True,
                    check_gaps=True,
                    gap_begin=0,
                    gap_end=0,
                    path=path,
                )
            )
            == 0
        )
    finally:
        os.close(fd)
    assert (
        len(_engine.checksum_regions(ptrs=empty, nbytes=empty, num_threads=2, task_nbytes=4096))
        == 0
    )


def _written(tmp_path, seed=3, big=((2, 300_000),)):
    bufs, offsets, end = _random_regions(seed, 30, big)
    ptrs, nbytes = _arrays(bufs)
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    _engine.write_regions(
        fd=fd,
        ptrs=ptrs,
        nbytes=nbytes,
        file_offsets=offsets,
        num_threads=2,
        task_nbytes=65536,
        checksum=True,
        path=path,
    )
    return fd, path, bufs, offsets, nbytes, end


def _read_all(fd, bufs, nbytes, offsets, end, path, check_gaps=True, task=65536):
    outs = [np.empty(b.size, dtype=np.uint8) for b in bufs]
    optrs, _ = _arrays(outs)
    return _engine.read_regions(
        fd=fd,
        ptrs=optrs,
        nbytes=nbytes,
        file_offsets=offsets,
        num_threads=2,
        task_nbytes=task,
        checksum=True,
        check_gaps=check_gaps,
        gap_begin=int(offsets[0]),
        gap_end=end,
        path=path,
    )


@pytest.mark.parametrize("cut", [1, 4096, 200_000])
def test_read_regions_truncated(tmp_path, cut):
    fd, path, bufs, offsets, nbytes, end = _written(tmp_path)
    try:
        os.ftruncate(fd, end - cut)
        with pytest.raises(FormatError) as e:
            _read_all(fd, bufs, nbytes, offsets, end, path)
        assert path in str(e.value)
    finally:
        os.close(fd)


def test_read_regions_nonzero_gap(tmp_path):
    fd, path, bufs, offsets, nbytes, end = _written(tmp_path)
    try:
        gaps = [
            int(offsets[i]) + int(nbytes[i])
            for i in range(len(bufs) - 1)
            if int(offsets[i + 1]) > int(offsets[i]) + int(nbytes[i])
        ]
        assert len(gaps) >= 3
        for at in (gaps[0], gaps[len(gaps) // 2], gaps[-1]):
            os.pwrite(fd, b"\x01", at)
            with pytest.raises(FormatError, match="padding") as e:
                _read_all(fd, bufs, nbytes, offsets, end, path)
            assert path in str(e.value) and str(at) in str(e.value)
            # the same bytes read fine when gaps are not checked
            _read_all(fd, bufs, nbytes, offsets, end, path, check_gaps=False)
            os.pwrite(fd, b"\x00", at)
        _read_all(fd, bufs, nbytes, offsets, end, path)
    finally:
        os.close(fd)


def test_read_regions_nonzero_bytes_before_the_first_region(tmp_path):
    fd, path, bufs, offsets, nbytes, end = _written(tmp_path)
    try:
        first = int(offsets[0])
        os.pwrite(fd, b"\x07", 0)  # before gap_begin: not checked
        _read_all(fd, bufs, nbytes, offsets, end, path)
        outs = [np.empty(b.size, dtype=np.uint8) for b in bufs]
        optrs, _ = _arrays(outs)
        with pytest.raises(FormatError, match="padding"):
            _engine.read_regions(
                fd=fd,
                ptrs=optrs,
                nbytes=nbytes,
                file_offsets=offsets,
                num_threads=2,
                task_nbytes=65536,
                checksum=True,
                check_gaps=True,
                gap_begin=0,
                gap_end=end,
                path=path,
            )
        assert first > 0
    finally:
        os.close(fd)


# The keyword-only signature of every I/O binding: the names callers pass, in order.
IO_BINDINGS = {
    "write_regions": "fd ptrs nbytes file_offsets num_threads task_nbytes checksum path writeback",
    "read_regions": "fd ptrs nbytes file_offsets num_threads task_nbytes checksum check_gaps "
    "gap_begin gap_end path hugepages zip_crc",
    "checksum_regions": "ptrs nbytes num_threads task_nbytes zip_crc",
    "hash_regions": "addresses nbytes num_threads",
    "device_read_regions": "backend device fd ptrs nbytes file_offsets zero_offsets zero_nbytes "
    "num_threads staging_nbytes staging_buffers checksum path gds_fd zip_crc",
    "device_write_regions": "backend device fd ptrs nbytes file_offsets num_threads staging_nbytes "
    "staging_buffers checksum path gds_fd",
}


@pytest.mark.parametrize("name", sorted(IO_BINDINGS))
def test_io_bindings_take_keywords_only(name):
    signature = getattr(_engine, name).__doc__.splitlines()[0]
    assert signature.startswith(f"{name}(*, "), signature
    assert re.findall(r"(\w+): ", signature) == IO_BINDINGS[name].split()


def _binding_params(doc: str) -> list[tuple[str, bool, bool]]:
    """(name, keyword-only, has a default) of each parameter of a pybind11 signature line."""
    inner = doc.splitlines()[0].split("(", 1)[1].rsplit(") -> ", 1)[0]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    out, kw_only = [], False
    for part in parts:
        if part == "*":
            kw_only = True
            continue
        out.append((part.split(":", 1)[0], kw_only, " = " in part))
    return out


def test_the_stub_declares_every_binding_as_it_is():
    # python/tensorfile/_engine.pyi is what mypy checks the package's calls against.
    import ast

    with open(os.path.join(os.path.dirname(_engine.__file__), "_engine.pyi")) as f:
        stub = ast.parse(f.read())
    declared = {}
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            params = [(x.arg, False, False) for x in a.args]
            for k in range(len(a.args) - len(a.defaults), len(a.args)):
                params[k] = (params[k][0], False, True)
            params += [(x.arg, True, d is not None) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
            declared[node.name] = params
    bound = {n: getattr(_engine, n) for n in dir(_engine) if not n.startswith("__")}
    assert sorted(declared) == sorted(bound)
    for name, fn in bound.items():
        assert declared[name] == _binding_params(fn.__doc__), name


def test_a_positional_io_call_is_refused(tmp_path):
    empty = np.zeros(0, dtype=np.uint64)
    args = dict(fd=0, ptrs=empty, nbytes=empty, file_offsets=empty, num_threads=1)
    kw = dict(args, task_nbytes=4096, checksum=True, path=str(tmp_path / "x"))
    assert len(_engine.write_regions(**kw)) == 0
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _engine.write_regions(*kw.values())


def test_regions_must_be_sorted_and_disjoint(tmp_path):
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    a = np.zeros(100, dtype=np.uint8)
    ptrs = np.array([a.ctypes.data, a.ctypes.data], dtype=np.uint64)
    nbytes = np.array([100, 100], dtype=np.uint64)
    try:
        for offsets in ([100, 0], [0, 50]):
            offs = np.array(offsets, dtype=np.uint64)
            with pytest.raises(ValueError):
                _engine.write_regions(
                    fd=fd,
                    ptrs=ptrs,
                    nbytes=nbytes,
                    file_offsets=offs,
                    num_threads=1,
                    task_nbytes=4096,
                    checksum=True,
                    path=path,
                )
            with pytest.raises(ValueError):
                _engine.read_regions(
                    fd=fd,
                    ptrs=ptrs,
                    nbytes=nbytes,
                    file_offsets=offs,
                    num_threads=1,
                    task_nbytes=4096,
                    checksum=True,
                    check_gaps=False,
                    gap_begin=0,
                    gap_end=0,
                    path=path,
                )
        with pytest.raises(ValueError):
            _engine.write_regions(
                fd=fd,
                ptrs=ptrs,
                nbytes=nbytes[:1],
                file_offsets=np.zeros(2, np.uint64),
                num_threads=1,
                task_nbytes=4096,
                checksum=True,
                path=path,
            )
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- errors


def _bad_fd():
    """A descriptor number that is not open in this process."""
    for candidate in range(100_000, 100_100):
        try:
            os.fstat(candidate)
        except OSError:
            return candidate
    pytest.skip("no free descriptor number found")


def test_bad_fd_raises_ebadf():
    fd = _bad_fd()
    buf = np.ones(5000, dtype=np.uint8)
    ptrs = np.array([buf.ctypes.data], dtype=np.uint64)
    nbytes = np.array([buf.size], dtype=np.uint64)
    offsets = np.array([0], dtype=np.uint64)
    with pytest.raises(OSError) as e:
        _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=1,
            task_nbytes=4096,
            checksum=True,
            path="/some/file.tf",
        )
    assert e.value.errno == errno.EBADF
    assert e.value.filename == "/some/file.tf" and "/some/file.tf" in str(e.value)
    assert not isinstance(e.value, FormatError)
    with pytest.raises(OSError) as e:
        _engine.read_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=1,
            task_nbytes=4096,
            checksum=True,
            check_gaps=False,
            gap_begin=0,
            gap_end=0,
            path="/other.tf",
        )
    assert e.value.errno == errno.EBADF and e.value.filename == "/other.tf"
    with pytest.raises(OSError) as e:
        _engine.preallocate(fd, 4096, "/third.tf")
    assert e.value.errno == errno.EBADF


def test_read_only_fd_raises_ebadf_on_write(tmp_path):
    path = str(tmp_path / "ro.bin")
    with open(path, "wb"):
        pass
    fd = os.open(path, os.O_RDONLY)
    buf = np.ones(10, dtype=np.uint8)
    try:
        with pytest.raises(OSError) as e:
            _engine.write_regions(
                fd=fd,
                ptrs=np.array([buf.ctypes.data], np.uint64),
                nbytes=np.array([10], np.uint64),
                file_offsets=np.array([0], np.uint64),
                num_threads=1,
                task_nbytes=4096,
                checksum=True,
                path=path,
            )
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_injected_write_fault(tmp_path, err):
    bufs, offsets, _ = _random_regions(4, 10, ((1, 1 << 20),))
    ptrs, nbytes = _arrays(bufs)
    path = str(tmp_path / "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _engine._inject_write_fault(1, err)
        with pytest.raises(OSError) as e:
            _engine.write_regions(
                fd=fd,
                ptrs=ptrs,
                nbytes=nbytes,
                file_offsets=offsets,
                num_threads=1,
                task_nbytes=65536,
                checksum=True,
                path=path,
            )
        assert e.value.errno == err and e.value.filename == path
    finally:
        _engine._inject_write_fault(0, 0)
        os.close(fd)
    # disarmed
    fd = os.open(path, os.O_RDWR)
    try:
        _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=1,
            task_nbytes=65536,
            checksum=True,
            path=path,
        )
    finally:
        os.close(fd)


# zip CRC-32: the checksum torch.save zip records carry, checked against zlib.


@pytest.mark.parametrize("software", [False, True])
def test_crc32_zip_equals_zlib(software):
    import zlib

    rng = random.Random(7)
    data = os.urandom(1 << 18)
    lengths = list(range(0, 200)) + [rng.randrange(0, 1 << 18) for _ in range(100)]
    for n in lengths:
        off = rng.randrange(0, 64)
        chunk = data[off : off + n]
        start = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])
        assert _engine.crc32_zip(chunk, start, software) == zlib.crc32(chunk, start), (n, off)


def test_crc32_zip_combine():
    import zlib

    a, b = os.urandom(1000), os.urandom(70_001)
    assert _engine.crc32_zip_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert _engine.crc32_zip_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


@pytest.mark.parametrize("threads, task", [(1, 4096), (3, 65536)])
def test_zip_crc_regions_read_and_memory(tmp_path, threads, task):
    import zlib

    bufs, offsets, _ = _random_regions(threads + 11, 120, BIG)
    ptrs, nbytes = _arrays(bufs)
    path = str(tmp_path / "zip.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _engine.write_regions(
            fd=fd,
            ptrs=ptrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=threads,
            task_nbytes=task,
            checksum=False,
            path=path,
        )
        outs = [np.empty(b.size, dtype=np.uint8) for b in bufs]
        optrs, _ = _arrays(outs)
        got = _engine.read_regions(
            fd=fd,
            ptrs=optrs,
            nbytes=nbytes,
            file_offsets=offsets,
            num_threads=threads,
            task_nbytes=task,
            checksum=True,
            check_gaps=False,
            gap_begin=0,
            gap_end=0,
            path=path,
            zip_crc=True,
        )
    finally:
        os.close(fd)
    want = [zlib.crc32(b.tobytes()) for b in bufs]
    assert [int(c) for c in got] == want
    mem = _engine.checksum_regions(
        ptrs=ptrs, nbytes=nbytes, num_threads=threads, task_nbytes=task, zip_crc=True
    )
    assert [int(c) for c in mem] == want


def test_saves_that_fsync_ask_for_early_writeback(tmp_path, monkeypatch):
    # Early writeback (sync_file_range after each task) is for writes that end in an
    # fsync: durable saves, save_safetensors and convert; a non-durable save leaves
    # writeback to the kernel.
    torch = pytest.importorskip("torch")
    import tensorfile
    from tensorfile import _convert

    seen = []
    real = _engine.write_regions

    def recording(**kwargs):
        seen.append(kwargs.get("writeback", False))
        return real(**kwargs)

    monkeypatch.setattr(_engine, "write_regions", recording)
    obj = {"w": torch.arange(1000.0), "b": torch.ones(3)}
    cases = [
        (lambda: tensorfile.save(obj, tmp_path / "a.tf"), True),
        (lambda: tensorfile.save(obj, tmp_path / "b.tf", durable=False), False),
        (lambda: tensorfile.save_safetensors(obj, tmp_path / "c.safetensors"), True),
        (
            lambda: tensorfile.save_safetensors(obj, tmp_path / "d.safetensors", durable=False),
            False,
        ),
        (
            lambda: _convert.convert(
                str(tmp_path / "a.tf"), str(tmp_path / "e.safetensors"), "safetensors"
            ),
            True,
        ),
    ]
    for run, want in cases:
        seen.clear()
        run()
        assert seen and set(seen) == {want}
    assert torch.equal(tensorfile.load(tmp_path / "e.safetensors")["w"], obj["w"])
