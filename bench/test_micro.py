"""pytest-benchmark micro-benchmarks of the engine parts: checksum throughput per core,
header encode/decode and planning for 20,000 tensors.

    python -m pytest bench/test_micro.py --benchmark-only
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tensorfile import _engine
from tensorfile._plan import plan_save
from tensorfile._tree import Flattener, no_gc
from tensorfile.formats import native

SMALL = 20_000


def _paused(fn):
    """fn with the cyclic collector paused, as save and load run it."""

    def run(*args):
        with no_gc():
            return fn(*args)

    return run


@pytest.fixture(scope="module")
def small_state():
    rng = np.random.default_rng(0)
    return {f"layer{i}.w": torch.randn(int(n)) for i, n in enumerate(rng.integers(16, 4097, SMALL))}


def test_crc32c_one_core(benchmark):
    buf = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    benchmark(_engine.crc32c, buf)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = buf.nbytes / benchmark.stats.stats.median / 1e9


def test_plan_20000_tensors(benchmark, small_state):
    def plan():
        flat = Flattener()
        tree = flat.flatten(small_state)
        return tree, plan_save(flat.leaves, lambda i, m: TypeError(m))

    benchmark(_paused(plan))


def test_header_encode_20000_tensors(benchmark, small_state):
    flat = Flattener()
    tree = flat.flatten(small_state)
    plan = plan_save(flat.leaves, lambda i, m: TypeError(m))
    benchmark(native.encode_header, tree, plan.table, plan.offsets, plan.nbytes, plan.devices, {})


def test_header_decode_20000_tensors(benchmark, small_state, tmp_path):
    import tensorfile

    path = tmp_path / "small.tf"
    tensorfile.save(small_state, path, durable=False)
    raw = path.read_bytes()
    pre = native.parse_preamble(raw[:32], len(raw), str(path))
    header = raw[32 : 32 + pre.header_nbytes]
    benchmark(_paused(native.parse_header), header, pre, raw[:32], str(path), True)
    os.unlink(path)
