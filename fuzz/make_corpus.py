"""Writes the seed corpus for fuzz_load.py: small valid files covering every node type."""

from __future__ import annotations

import collections
import os
import sys

import numpy as np
import tensorfile
import torch

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
os.makedirs(out, exist_ok=True)
base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
seeds = {
    "tensor": torch.arange(3, dtype=torch.int32),
    "list": [torch.zeros(2), torch.ones(1, dtype=torch.bool)],
    "views": {"a": base, "b": base.t(), "c": base[1:, ::2], "p": torch.nn.Parameter(torch.ones(2))},
    "plain": {
        1: (None, True, 2**70, float("nan"), 1 + 2j, b"xy", bytearray(b"z")),
        "s": torch.Size([2]),
    },
    "torchvals": {
        "d": torch.float16,
        "dev": torch.device("cpu"),
        "od": collections.OrderedDict(a=1),
    },
    "numpy": {
        "x": np.arange(6.0).reshape(2, 3)[:, ::-1],
        "s": np.float32(1.5),
        "b": np.array([True, False]),
    },
    "empty": [torch.empty(0), torch.ones(2), torch.empty(0)],
    "nested": [[[[{"k": torch.ones(1)}]]]],
}
for name, obj in seeds.items():
    path = os.path.join(out, f"seed-{name}.tf")
    tensorfile.save(obj, path, metadata={"seed": name})
    with open(path, "rb") as f:
        data = f.read()
    # fuzz_load.py reads its mode from the first byte: one raw seed, one fixed-up seed.
    for mode in (0, 1):
        with open(os.path.join(out, f"seed-{name}-{mode}"), "wb") as f:
            f.write(bytes([mode]) + data)
    os.unlink(path)

# Files of the other formats load() reads: torch.save zips and safetensors files.
foreign = {
    "torchsave-views": lambda p: torch.save(
        {
            "a": base,
            "b": base.t(),
            "p": torch.nn.Parameter(torch.ones(2)),
            "n": (1, "s", {2: None}),
        },
        p,
    ),
    "torchsave-fp8": lambda p: torch.save(
        [torch.zeros(3, dtype=torch.float8_e4m3fn), torch.ones(1)], p
    ),
}
try:
    from safetensors.torch import save_file

    foreign["safetensors"] = lambda p: save_file(
        {"w": base, "m": torch.tensor([True, False]), "e": torch.empty(0, 2)},
        p,
        metadata={"k": "v"},
    )
except ImportError:
    pass
for name, write in foreign.items():
    path = os.path.join(out, f"seed-{name}.bin")
    write(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(os.path.join(out, f"seed-{name}-0"), "wb") as f:
        f.write(b"\0" + data)
    os.unlink(path)
