"""The engine's XXH3-128 content hash against python-xxhash: every short and medium length,
long inputs across block boundaries, streaming splits, unaligned starts, every kernel, and
hash_regions against the one-shot hash."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorfile import _engine

xxhash = pytest.importorskip("xxhash")

KERNELS = _engine._xxh3_kernels()
DATA = np.random.default_rng(1234).integers(0, 256, size=(8 << 20) + 4096, dtype=np.uint8)


def ref(data) -> bytes:
    return xxhash.xxh3_128_digest(bytes(data))


def test_known_digests():
    # Fixed values, so the hash cannot drift even if the reference library did.
    assert _engine.xxh3_128(b"").hex() == "99aa06d3014798d86001c324468d497f"
    assert _engine.xxh3_128(b"a").hex() == "a96faf705af16834e6c632b61e964e1f"
    assert _engine.xxh3_128(bytes(range(256)) * 5).hex() == ref(bytes(range(256)) * 5).hex()


def test_kernels_include_the_scalar_one_and_simd_on_x86():
    import platform

    assert KERNELS[0] == "scalar"
    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in KERNELS


def test_every_length_to_2048_matches_xxhash():
    data = DATA[:2048].tobytes()
    for n in range(2049):
        expected = ref(data[:n])
        assert _engine.xxh3_128(data[:n]) == expected, n
        for kernel in KERNELS:
            assert _engine._xxh3_128_with(data[:n], kernel) == expected, (n, kernel)


# Around the edges of the long path: its 240-byte start, the 256-byte streaming buffer,
# 64-byte stripes and 1024-byte blocks.
EDGES = sorted(
    {240, 241, 255, 256, 257, 319, 320, 321}
    | {
        k * 1024 + d
        for k in (1, 2, 3, 4, 16, 64, 1024)
        for d in (-65, -64, -63, -1, 0, 1, 63, 64, 65)
    }
)


@pytest.mark.parametrize("kernel", KERNELS)
def test_lengths_at_stripe_and_block_edges(kernel):
    for n in EDGES:
        data = DATA[:n]
        expected = ref(data)
        assert _engine._xxh3_128_with(data, kernel) == expected, n
        assert _engine._xxh3_128_parts([data[: n // 2], data[n // 2 :]], kernel)[-1] == expected, n


@pytest.mark.parametrize("kernel", KERNELS)
def test_streaming_one_byte_at_a_time_gives_every_prefix_digest(kernel):
    data = DATA[:2300].tobytes()
    digests = _engine._xxh3_128_parts([data[i : i + 1] for i in range(len(data))], kernel)
    assert digests == [ref(data[: i + 1]) for i in range(len(data))]


def test_streaming_with_empty_parts():
    data = DATA[:5000].tobytes()
    parts = [b"", data[:300], b"", b"", data[300:4000], b"", data[4000:], b""]
    digests = _engine._xxh3_128_parts(parts)
    assert digests[0] == ref(b"")
    assert digests[-1] == digests[-2] == ref(data)
    assert _engine._xxh3_128_parts([]) == []


@settings(max_examples=60, deadline=None)
@given(
    n=st.one_of(st.integers(0, 4096), st.integers(0, 3 << 20)),
    start=st.integers(0, 4095),
    cuts=st.lists(st.floats(0, 1), max_size=8),
    kernel=st.sampled_from(KERNELS),
)
def test_random_lengths_splits_and_starts(n, start, cuts, kernel):
    data = DATA[start : start + n]
    expected = ref(data)
    assert _engine._xxh3_128_with(data, kernel) == expected
    points = sorted({int(c * n) for c in cuts})
    bounds = [0, *points, n]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    digests = _engine._xxh3_128_parts(parts, kernel)
    assert digests[-1] == expected
    assert digests[0] == ref(parts[0])


@pytest.mark.parametrize("start", range(0, 65, 1))
def test_unaligned_starts(start):
    n = 5 * 1024 + 77
    view = memoryview(DATA)[start : start + n]
    expected = ref(view)
    for kernel in KERNELS:
        assert _engine._xxh3_128_with(view, kernel) == expected, kernel


def test_kernels_agree_on_a_large_buffer():
    data = DATA[3 : 3 + (8 << 20)]
    digests = {kernel: _engine._xxh3_128_with(data, kernel) for kernel in KERNELS}
    assert set(digests.values()) == {ref(data)}


def test_takes_any_contiguous_buffer():
    floats = np.arange(1000, dtype=np.float32)
    assert _engine.xxh3_128(floats) == ref(floats.tobytes())
    assert _engine.xxh3_128(bytearray(b"abc" * 100)) == ref(b"abc" * 100)
    assert _engine.xxh3_128(memoryview(b"xyz" * 200)) == ref(b"xyz" * 200)
    assert _engine.xxh3_128(floats.reshape(10, 100)) == ref(floats.tobytes())


def test_refuses_a_strided_buffer():
    strided = np.arange(1000, dtype=np.uint8)[::2]
    with pytest.raises(BufferError):
        _engine.xxh3_128(memoryview(strided))
    # numpy itself refuses a contiguous view of a strided array with ValueError.
    with pytest.raises(ValueError, match="not C-contiguous"):
        _engine.xxh3_128(strided)


def test_an_unknown_kernel_is_a_value_error():
    with pytest.raises(ValueError, match="unknown XXH3 kernel 'avx9'"):
        _engine._xxh3_128_with(b"abc", "avx9")


def _regions(rng, count, max_nbytes):
    nbytes = rng.integers(0, max_nbytes, size=count, dtype=np.uint64)
    nbytes[rng.random(count) < 0.1] = 0
    starts = rng.integers(0, len(DATA) - max_nbytes, size=count, dtype=np.uint64)
    return starts, nbytes


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
def test_hash_regions_matches_one_shot(num_threads):
    rng = np.random.default_rng(num_threads)
    # Many small regions, some large ones, overlapping each other as memory may.
    starts, nbytes = _regions(rng, 300, 5000)
    big_starts, big_nbytes = _regions(rng, 6, 2 << 20)
    starts = np.concatenate([starts, big_starts])
    nbytes = np.concatenate([nbytes, big_nbytes])
    base = DATA.ctypes.data
    digests = _engine.hash_regions(
        addresses=starts + np.uint64(base), nbytes=nbytes, num_threads=num_threads
    )
    assert digests == [ref(DATA[s : s + n]) for s, n in zip(starts.tolist(), nbytes.tolist())]


def test_hash_regions_of_nothing_and_mismatched_columns():
    empty = np.zeros(0, dtype=np.uint64)
    assert _engine.hash_regions(addresses=empty, nbytes=empty, num_threads=4) == []
    with pytest.raises(ValueError, match="1-d arrays of one length"):
        _engine.hash_regions(addresses=np.zeros(2, np.uint64), nbytes=empty, num_threads=1)


def test_hash_speed_bench_runs():
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "hash_speed.py")
    out = subprocess.run(
        [sys.executable, script, "--mib", "2", "--runs", "1", "--regions", "8", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    gbps = report["gbps"]
    expected = {f"xxh3_128[{k}]" for k in KERNELS} | {
        "xxh3_128",
        "xxhash.xxh3_128_digest",
        "hash_regions[1]",
        "hash_regions[2]",
        "crc32c",
        "checksum_regions[1]",
        "checksum_regions[2]",
    }
    assert set(gbps) == expected
    assert all(v > 0 for v in gbps.values())
    ratios = report["ratios"]
    assert ratios["xxh3_128 / xxhash"] == pytest.approx(
        gbps["xxh3_128"] / gbps["xxhash.xxh3_128_digest"]
    )
    assert ratios["hash_regions[2] / hash_regions[1]"] == pytest.approx(
        gbps["hash_regions[2]"] / gbps["hash_regions[1]"]
    )


def test_hash_and_checksum_regions_is_both_in_one_pass() -> None:
    rng = np.random.default_rng(5)
    buf = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    sizes = [0, 1, 17, 240, 241, 65535, 65536, 65537, 1 << 20, (1 << 20) + 3]
    starts = np.cumsum([0, *sizes[:-1]])
    addrs = np.array([buf.ctypes.data + int(s) for s in starts], dtype=np.uint64)
    nb = np.array(sizes, dtype=np.uint64)
    for threads in (1, 2, 3):
        digests, crcs = _engine.hash_and_checksum_regions(
            addresses=addrs, nbytes=nb, num_threads=threads
        )
        assert digests == [xxhash.xxh3_128_digest(buf[s : s + n]) for s, n in zip(starts, sizes)]
        assert crcs.tolist() == [_engine.crc32c(buf[s : s + n]) for s, n in zip(starts, sizes)]
