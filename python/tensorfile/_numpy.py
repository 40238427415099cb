"""numpy adapter: destinations for numpy storages, arrays as views of them, and the
bytes of an array to write."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._dtypes import ITEMSIZE, numpy_name
from .formats import TensorRow


def allocate(nbytes: int) -> tuple[np.ndarray, int]:
    """A fresh uint8 destination of `nbytes` and its address."""
    a = np.empty(nbytes, dtype=np.uint8)
    return a, a.ctypes.data


def view(row: TensorRow, buf: Any) -> np.ndarray:
    """The array of a numpy row over its storage's bytes (strides in bytes)."""
    return np.ndarray(
        tuple(row.shape),
        dtype=np.dtype(row.dtype),
        buffer=buf,
        offset=row.offset,
        strides=tuple(row.strides),
    )


def byte_view(row: TensorRow, buf: np.ndarray, at: int) -> np.ndarray:
    """A row's bytes as a uint8 view of `buf` (its storage starting at `at`), with the
    row's strides in bytes and an extra last axis for the element's bytes."""
    item = ITEMSIZE[row.kind][row.dtype]
    bstrides = list(row.strides) if row.kind == "numpy" else [st * item for st in row.strides]
    if 0 in row.shape:
        return np.empty((*row.shape, item), dtype=np.uint8)
    return np.ndarray((*row.shape, item), np.uint8, buf, at + row.offset, (*bstrides, 1))


def flat_entry(
    a: np.ndarray, supported: Callable[[str], bool], refuse: Callable[[str], TypeError]
) -> tuple[str, list[int], int, int, tuple[int, int], Any]:
    """(dtype name, shape, nbytes, address of contiguous bytes, (lo, hi) memory span of
    the original, owner of the bytes) of an array written as one flat entry."""
    dname = numpy_name(a.dtype)
    if dname is None or not supported(dname):
        raise refuse(f"numpy dtype {a.dtype} is not supported")
    span = (0, 0)
    if a.size:
        addr = a.__array_interface__["data"][0]
        lo = addr + sum((d - 1) * s for d, s in zip(a.shape, a.strides) if s < 0)
        hi = addr + a.itemsize + sum((d - 1) * s for d, s in zip(a.shape, a.strides) if s > 0)
        span = (lo, hi)
    data = np.ascontiguousarray(a)
    return dname, list(a.shape), data.nbytes, data.ctypes.data, span, data
