"""Deterministic synthetic workloads for the demo and the benchmark: a transformer-shaped state dict and many small tensors."""

from __future__ import annotations

import math
import os
from typing import Any

ITEMSIZE = {"float32": 4, "bfloat16": 2}

# Random values are drawn once into a pool and tiled into the tensors: drawing 1 GiB of
# normals costs seconds per child process, and no system under test compresses, so
# repeats in the bytes change nothing that is measured.
_POOL_ELEMS = 1 << 20


def transformer_shapes(nbytes: int, dtype: str = "float32") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama-style decoder whose weights take about `nbytes` in `dtype`.

    The width grows with the size so that a large model has many mid-sized layers and a
    tiny one still has several, as real checkpoints do."""
    params = max(1, nbytes // ITEMSIZE[dtype])
    d = 128
    for width in (256, 512, 768, 1024, 1536, 2048, 4096):
        if 12 * width * width * 16 <= params:
            d = width
    ffn = 256 * math.ceil(8 * d / 3 / 256)
    vocab = max(256, min(32000, params // (8 * d)))
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d
    layers = max(1, round((params - 2 * vocab * d - d) / per_layer))
    shapes: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "attention_norm.weight", (d,)),
            (p + "attention.wq.weight", (d, d)),
            (p + "attention.wk.weight", (d, d)),
            (p + "attention.wv.weight", (d, d)),
            (p + "attention.wo.weight", (d, d)),
            (p + "ffn_norm.weight", (d,)),
            (p + "feed_forward.w1.weight", (ffn, d)),
            (p + "feed_forward.w2.weight", (d, ffn)),
            (p + "feed_forward.w3.weight", (ffn, d)),
        ]
    shapes += [("norm.weight", (d,)), ("output.weight", (vocab, d))]
    return shapes


def small_shapes(count: int, seed: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of `count` 1-d tensors of 16 to 4096 elements, sizes drawn from `seed`."""
    import numpy as np

    sizes = np.random.default_rng(seed).integers(16, 4097, size=count)
    width = len(str(max(count - 1, 0)))
    return [(f"t{i:0{width}d}", (int(n),)) for i, n in enumerate(sizes)]


def payload_nbytes(shapes: list[tuple[str, tuple[int, ...]]], dtype: str) -> int:
    return sum(math.prod(shape) for _, shape in shapes) * ITEMSIZE[dtype]


def build(shapes: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int = 0) -> dict[str, Any]:
    """The state dict for `shapes`, filled with normal values that depend only on `seed`."""
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_ELEMS, generator=gen, dtype=dt)
    pool = torch.cat([pool, pool])  # any window of up to _POOL_ELEMS starting in the first half
    out: dict[str, Any] = {}
    for i, (name, shape) in enumerate(shapes):
        t = torch.empty(shape, dtype=dt)
        flat = t.view(-1)
        start = (i * 7919) % _POOL_ELEMS
        for at in range(0, flat.numel(), _POOL_ELEMS):
            k = min(_POOL_ELEMS, flat.numel() - at)
            flat[at : at + k].copy_(pool[start : start + k])
        out[name] = t
    return out


WORKLOADS = ("transformer-fp32", "transformer-bf16", "small-fp32")


def shapes_for(
    workload: str, size_mb: float, small_count: int
) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """Shapes and dtype of a named workload. The bf16 transformer has the fp32 one's
    shapes, so it is the same model at half the bytes."""
    if workload == "transformer-fp32":
        return transformer_shapes(int(size_mb * (1 << 20)), "float32"), "float32"
    if workload == "transformer-bf16":
        return transformer_shapes(int(size_mb * (1 << 20)), "float32"), "bfloat16"
    if workload == "small-fp32":
        return small_shapes(small_count), "float32"
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(path: str) -> None:
    """What tensorfile's durable=True promises, for the peers: the file's bytes and its
    directory entry on disk."""
    from .api import _fsync_dir

    fsync_file(path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
