"""Deterministic synthetic workloads for the demo and the benchmark: a transformer-shaped state dict, many small tensors, and a training checkpoint (model and Adam state)."""

from __future__ import annotations

import math
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


def build(
    shapes: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    seed: int = 0,
    *,
    empty: bool = False,
    fork_safe: bool = False,
    positive: bool = False,
) -> dict[str, Any]:
    """The state dict for `shapes`, filled with normal values that depend only on `seed`
    (their absolute values with positive=True); with empty=True, torch.empty tensors
    (untouched memory, as a model a load fills). fork_safe=True fills the tensors through
    numpy (torch.from_numpy, no torch kernel runs), so that no torch thread pool starts
    in a process that forks afterwards: a child of a process whose OpenMP pool started
    can hang in its first parallel kernel."""
    import torch

    dt = getattr(torch, dtype)
    if empty:
        return {name: torch.empty(shape, dtype=dt) for name, shape in shapes}
    if fork_safe:
        return _build_numpy(shapes, dtype, seed, positive)
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
        out[name] = t.abs_() if positive else t
    return out


def _build_numpy(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int, positive: bool
) -> dict[str, Any]:
    import numpy as np
    import torch

    pool = np.random.default_rng(seed).standard_normal(_POOL_ELEMS, dtype=np.float32)
    if positive:
        pool = np.abs(pool)
    if dtype == "bfloat16":  # numpy has no bfloat16: the top half of each float32 is one
        pool = (pool.view(np.uint32) >> 16).astype(np.uint16)
    pool = np.concatenate([pool, pool])  # any window of up to _POOL_ELEMS in the first half
    dt = getattr(torch, dtype)
    out: dict[str, Any] = {}
    for i, (name, shape) in enumerate(shapes):
        # A tensor of torch's own allocation, filled through a numpy view of its memory:
        # like a model's weights it is not a view of anything (torch.from_numpy(...).view
        # would make every tensor an autograd view, which state dicts never hold).
        t = torch.empty(shape, dtype=dt)
        flat = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy().reshape(-1)
        flat = flat.view(pool.dtype)
        start = (i * 7919) % _POOL_ELEMS
        for at in range(0, flat.size, _POOL_ELEMS):
            k = min(_POOL_ELEMS, flat.size - at)
            flat[at : at + k] = pool[start : start + k]
        out[name] = t
    return out


WORKLOADS = ("transformer-fp32", "transformer-bf16", "small-fp32", "checkpoint")

# The checkpoint workload holds the model's weights three times (weights, exp_avg,
# exp_avg_sq), so its model is a third of the checkpoint's bytes.
_CHECKPOINT_COPIES = 3


def shapes_for(
    workload: str, size_mb: float, small_count: int
) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """Shapes and dtype of a named workload. The bf16 transformer has the fp32 one's
    shapes, so it is the same model at half the bytes. For the checkpoint these are the
    model's shapes; `describe` and `build_workload` add the optimizer state."""
    if workload == "transformer-fp32":
        return transformer_shapes(int(size_mb * (1 << 20)), "float32"), "float32"
    if workload == "transformer-bf16":
        return transformer_shapes(int(size_mb * (1 << 20)), "float32"), "bfloat16"
    if workload == "small-fp32":
        return small_shapes(small_count), "float32"
    if workload == "checkpoint":
        model_nbytes = int(checkpoint_mb(size_mb) * (1 << 20)) // _CHECKPOINT_COPIES
        return transformer_shapes(model_nbytes, "float32"), "float32"
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def checkpoint_mb(size_mb: float) -> float:
    """The checkpoint workload's size: half the model size flag (512 MiB by default), the
    "about 500 MB" training checkpoint of the benchmark's requirement."""
    return size_mb / 2


# torch.get_rng_state() of the CPU generator: a uint8 tensor of this many bytes.
_RNG_STATE_NBYTES = 5056


def describe(workload: str, size_mb: float, small_count: int) -> dict[str, Any]:
    """dtype, tensor count and payload bytes of a workload, without building it."""
    shapes, dtype = shapes_for(workload, size_mb, small_count)
    model = payload_nbytes(shapes, dtype)
    if workload != "checkpoint":
        return {"dtype": dtype, "tensors": len(shapes), "payload_bytes": model}
    n = len(shapes)
    return {
        "dtype": "float32 (+ uint8 rng state)",
        # weights, exp_avg, exp_avg_sq and a scalar step per parameter, and the rng state
        "tensors": 4 * n + 1,
        "payload_bytes": _CHECKPOINT_COPIES * model + 4 * n + _RNG_STATE_NBYTES,
    }


def build_workload(
    workload: str,
    size_mb: float,
    small_count: int,
    seed: int = 0,
    *,
    empty: bool = False,
    fork_safe: bool = False,
) -> Any:
    """The object a user of the workload would pass to torch.save; with empty=True the
    same structure over untouched torch.empty tensors (what loads in place fill);
    fork_safe as in `build`."""
    shapes, dtype = shapes_for(workload, size_mb, small_count)
    if workload != "checkpoint":
        return build(shapes, dtype, seed, empty=empty, fork_safe=fork_safe)
    return build_checkpoint(shapes, seed, empty=empty, fork_safe=fork_safe)


def build_checkpoint(
    shapes: list[tuple[str, tuple[int, ...]]],
    seed: int = 0,
    *,
    empty: bool = False,
    fork_safe: bool = False,
) -> dict[str, Any]:
    """A training checkpoint as torch users write one: {"model": model.state_dict(),
    "optimizer": Adam(...).state_dict(), "epoch": ..., "step": ..., "rng_state": ...},
    with the layout torch.optim.Adam's state_dict() has (per-parameter exp_avg,
    exp_avg_sq and a float32 scalar step keyed by parameter index; param_groups with
    the hyperparameters and the parameter indices)."""
    import torch

    model = build(shapes, "float32", seed, empty=empty, fork_safe=fork_safe)
    moments = build(shapes, "float32", seed + 1, empty=empty, fork_safe=fork_safe)
    # exp_avg_sq is a running mean of squares: never negative
    squares = build(shapes, "float32", seed + 2, empty=empty, fork_safe=fork_safe, positive=True)
    steps = 1000
    state: dict[int, dict[str, Any]] = {}
    for i, (name, _) in enumerate(shapes):
        state[i] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": moments[name],
            "exp_avg_sq": squares[name],
        }
    group = {
        "lr": 3e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
        "params": list(range(len(shapes))),
    }
    gen = torch.Generator().manual_seed(seed)
    rng = torch.empty(_RNG_STATE_NBYTES, dtype=torch.uint8) if empty else gen.get_state()
    return {
        "model": model,
        "optimizer": {"state": state, "param_groups": [group]},
        "epoch": 3,
        "step": steps,
        "rng_state": rng,
    }


def tensors_in(obj: Any) -> list[Any]:
    """Every tensor in a nest of dicts, lists and tuples, in order."""
    out: list[Any] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
        elif hasattr(x, "data_ptr") and hasattr(x, "element_size"):
            out.append(x)
    return out
