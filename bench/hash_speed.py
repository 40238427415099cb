"""Throughput of the engine's XXH3-128 content hash over one buffer already in memory:

    python bench/hash_speed.py              # a 256 MiB buffer, medians of 7 runs
    python bench/hash_speed.py --mib 64 --runs 5 --json

Compares the one-shot hash (each kernel this CPU runs) with python-xxhash's
xxh3_128_digest, hash_regions on 1 and 2 threads (the buffer cut into --regions equal
regions, since one region is hashed by one thread), and the engine's CRC32C over the same
bytes (one-shot, and checksum_regions on 1 and 2 threads). The cases take turns, round
after round. Prints GB/s (1e9 bytes per second) at each median and the ratios that
matter; --json prints one JSON line instead. Point PYTHONPATH at the tree whose engine
you want.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from tensorfile import _engine


def median_seconds(cases: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Each case's median wall seconds over `runs` rounds; a round runs every case once, so
    the load of a shared machine, as it drifts, weighs on all cases alike."""
    for fn in cases.values():
        fn()  # warm: page in the buffer, start the pool's threads
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in seconds.items()}


def measure(mib: int, runs: int, nregions: int) -> dict:
    nbytes = mib << 20
    buf = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    region_nbytes = nbytes // nregions
    addresses = np.arange(nregions, dtype=np.uint64) * np.uint64(region_nbytes) + np.uint64(
        buf.ctypes.data
    )
    sizes = np.full(nregions, region_nbytes, dtype=np.uint64)

    cases: dict[str, Callable[[], object]] = {}
    for kernel in _engine._xxh3_kernels():
        cases[f"xxh3_128[{kernel}]"] = lambda k=kernel: _engine._xxh3_128_with(buf, k)
    cases["xxh3_128"] = lambda: _engine.xxh3_128(buf)
    try:
        import xxhash

        cases["xxhash.xxh3_128_digest"] = lambda: xxhash.xxh3_128_digest(buf)
    except ImportError:
        pass
    for t in (1, 2):
        cases[f"hash_regions[{t}]"] = lambda t=t: _engine.hash_regions(
            addresses=addresses, nbytes=sizes, num_threads=t
        )
    cases["crc32c"] = lambda: _engine.crc32c(buf)
    for t in (1, 2):
        cases[f"checksum_regions[{t}]"] = lambda t=t: _engine.checksum_regions(
            ptrs=addresses, nbytes=sizes, num_threads=t, task_nbytes=8 << 20
        )
    gbps = {name: nbytes / s / 1e9 for name, s in median_seconds(cases, runs).items()}

    ratios = {}
    if "xxhash.xxh3_128_digest" in gbps:
        ratios["xxh3_128 / xxhash"] = gbps["xxh3_128"] / gbps["xxhash.xxh3_128_digest"]
        if "xxh3_128[sse2]" in gbps:
            ratios["xxh3_128[sse2] / xxhash"] = (
                gbps["xxh3_128[sse2]"] / gbps["xxhash.xxh3_128_digest"]
            )
    ratios["xxh3_128 / crc32c"] = gbps["xxh3_128"] / gbps["crc32c"]
    ratios["hash_regions[2] / hash_regions[1]"] = gbps["hash_regions[2]"] / gbps["hash_regions[1]"]
    ratios["hash_regions[1] / checksum_regions[1]"] = (
        gbps["hash_regions[1]"] / gbps["checksum_regions[1]"]
    )
    ratios["hash_regions[2] / checksum_regions[2]"] = (
        gbps["hash_regions[2]"] / gbps["checksum_regions[2]"]
    )
    return {"mib": mib, "runs": runs, "regions": nregions, "gbps": gbps, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="buffer size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per case (default 7)")
    parser.add_argument(
        "--regions", type=int, default=64, help="regions for hash_regions (default 64)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    report = measure(args.mib, args.runs, args.regions)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{args.mib} MiB buffer, medians of {args.runs} runs, hash_regions over {args.regions} regions"
    )
    for name, value in report["gbps"].items():
        print(f"  {name:28s} {value:7.2f} GB/s")
    for name, value in report["ratios"].items():
        print(f"  {name:40s} {value:6.2f}x")


if __name__ == "__main__":
    main()
