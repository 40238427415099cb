"""Comparison helpers shared by the round-trip and property tests."""

from __future__ import annotations

import collections
import math
import struct
from typing import Any

import numpy as np
import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The element bytes of `t` in logical (row-major) order, for any dtype: viewed as an
    integer type of the same width first, since many dtypes (bits8, uint3, float8, ...)
    have no copy kernel and no torch.equal."""
    t = t.detach()
    if t.numel() == 0:
        return b""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    as_int = _SAME_SIZE_INT.get(t.element_size())
    if as_int is not None:
        t = t.view(as_int)
    # A fresh 1-d buffer: .contiguous() may keep odd strides on size-1 or empty dims.
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()


def assert_tensor_same(a: Any, b: Any, path: str = "<root>") -> None:
    """`b` is a faithful copy of tensor `a`: type, dtype, shape, strides, grad flag, bytes."""
    assert type(b) is type(a), f"{path}: type {type(b)} != {type(a)}"
    assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
    assert b.shape == a.shape, f"{path}: shape {b.shape} != {a.shape}"
    assert b.stride() == a.stride(), f"{path}: strides {b.stride()} != {a.stride()}"
    assert b.requires_grad == a.requires_grad, f"{path}: requires_grad"
    assert b.device == a.device, f"{path}: device"
    assert tensor_bytes(b) == tensor_bytes(a), f"{path}: values differ"


def assert_array_same(a: np.ndarray, b: Any, path: str = "<root>") -> None:
    assert type(b) is np.ndarray, f"{path}: type {type(b)}"
    assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
    assert b.shape == a.shape, f"{path}: shape"
    assert b.strides == a.strides, f"{path}: strides {b.strides} != {a.strides}"
    assert b.tobytes() == a.tobytes(), f"{path}: values differ"


def float_same(a: float, b: float) -> bool:
    """Bitwise equal, except that any nan equals any nan."""
    if math.isnan(a) and math.isnan(b):
        return True
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_same(a: Any, b: Any, path: str = "<root>") -> None:
    """Deep, type-exact equality of a saved object and its loaded copy."""
    if isinstance(a, torch.Tensor):
        assert_tensor_same(a, b, path)
        return
    assert type(b) is type(a), f"{path}: type {type(b).__name__} != {type(a).__name__}"
    if isinstance(a, np.ndarray):
        assert_array_same(a, b, path)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert float_same(a, b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert float_same(a.real, b.real) and float_same(a.imag, b.imag), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(b)} != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: keys {kb!r} != {ka!r}"
        for x, y in zip(ka, kb):
            assert_same(x, y, f"{path}.<key {x!r}>")
        for k, y in zip(ka, b.values()):
            assert_same(a[k], y, f"{path}.{k}")
        if isinstance(a, collections.OrderedDict):
            assert_same(vars(a), vars(b), f"{path}.@attrs")
    else:
        assert b == a, f"{path}: {b!r} != {a!r}"


def leaves(obj: Any) -> list[Any]:
    """Tensors and arrays of a nested object, in a fixed traversal order."""
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, (torch.Tensor, np.ndarray)):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(obj)
    return out


def sharing_pattern(objs: list[Any]) -> set[tuple[int, int, str]]:
    """Pairs (i, j, how) of leaves that are the same object or share memory."""
    pairs = set()
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if a is b:
                pairs.add((i, j, "same object"))
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.numel() and b.numel():
                    pa, pb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
                    if pa and pa == pb:
                        pairs.add((i, j, "storage"))
            elif isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
                if np.shares_memory(a, b):
                    pairs.add((i, j, "memory"))
    return pairs


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c_py(data: bytes, crc: int = 0) -> int:
    """Reference CRC32C (Castagnoli, reflected), independent of the engine."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF
