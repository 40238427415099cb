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

# Seeds of fuzz_pickle.py: raw data.pkl records (first byte odd), from torch.save and by
# hand, each a shape the unpickler must bound (nesting, memo indices, frames, copies).
import io  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402


def _pickle_of(obj, protocol=2):
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    with zipfile.ZipFile(buf) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


pickles = {
    "torchsave-state-dict": _pickle_of({"w": base, "b": base[0], "p": torch.nn.Parameter(base[1])}),
    "torchsave-plain": _pickle_of(
        [{1: (2, "x")}, {3, 4}, bytearray(b"ab"), 1 + 2j, collections.OrderedDict(a=1)]
    ),
    "torchsave-protocol-5": _pickle_of({"t": base, "s": torch.Size([3])}, protocol=5),
    "deep-key": b"\x80\x02}" + b")" + b"\x85" * 10_000 + b"Ns.",
    "deep-lists": b"\x80\x02" + b"]" * 5_000 + b"a" * 4_999 + b".",
    "memo-2-29": b"\x80\x02Nr" + struct.pack("<I", 2**29) + b".",
    "memo-text-huge": b"\x80\x02Np99999999999999999999\n0g99999999999999999999\n.",
    "shared-tuple-key": b"\x80\x02}" + b")" + b"2\x86" * 150 + b"Ns.",
    "shared-tuple-value": b"\x80\x02]" + b")" + b"2\x86" * 150 + b"a.",
    "frame-too-long": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",
    "copies": b"\x80\x03B"
    + struct.pack("<I", 4096)
    + bytes(4096)
    + b"q\x00c__builtin__\nbytearray\nq\x01]("
    + b"h\x01h\x00\x85R" * 3000
    + b"e.",
}
for name, pkl in pickles.items():
    with open(os.path.join(out, f"pickle-{name}"), "wb") as f:
        f.write(b"\1" + pkl)
