"""Leaves -> storages (aliasing found, byte spans computed) -> rows and a write plan."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._dtypes import numpy_name
from ._torch import describe
from .formats.native import storage_offsets

_SPAN_ALIGN = 16  # the widest element; keeps every tensor's offset a multiple of its size


class _Refused(Exception):
    pass


def _raise(message: str) -> TypeError:
    raise _Refused(message)


@dataclass
class SavePlan:
    tensors: list[list[Any]]  # header rows: [kind, storage, dtype, shape, strides, offset, flags]
    storages: list[list[Any]]  # header rows: [offset, nbytes, device]
    ptrs: np.ndarray  # uint64 address of each storage's bytes (on storages[i][2]'s device)
    nbytes: np.ndarray  # uint64
    offsets: np.ndarray  # uint64, relative to the data section
    keepalive: list[Any] = field(default_factory=list)  # per storage: the object owning its memory


def plan_save(leaves: list[Any], error_at: Callable[[int, str], TypeError]) -> SavePlan:
    """Groups leaves by the memory they share and lays the storages out. Storages of
    torch tensors keep torch's sharing (one storage, one region); numpy arrays share a
    region when their bytes overlap. Only the span of a storage that some tensor
    references is written."""
    torch = sys.modules.get("torch")
    tensor_type = torch.Tensor if torch is not None else None
    groups: dict[Any, list[Any]] = {}  # key -> [storage owner, device, ptr, lo, hi, [row indexes]]
    rows: list[list[Any]] = []
    firsts: list[int] = []
    order: list[Any] = []
    np_items: list[tuple[int, int, int, int]] = []  # (lo, hi, row index, element-0 address)
    np_owner: dict[int, Any] = {}
    for i, leaf in enumerate(leaves):
        if tensor_type is not None and isinstance(leaf, tensor_type):
            try:
                key, storage, ptr, first, end, dtype, shape, strides, flags = describe(
                    torch, leaf, _raise
                )
            except _Refused as e:
                raise error_at(i, str(e)) from None
            g = groups.get(key)
            if g is None:
                g = groups[key] = [storage, leaf.device, ptr, None, None, []]
                order.append(key)
            if end > first:
                if g[3] is None:
                    g[3], g[4] = first, end
                else:
                    if first < g[3]:
                        g[3] = first
                    if end > g[4]:
                        g[4] = end
            g[5].append(i)
            rows.append(["torch", 0, dtype, shape, strides, 0, flags])
            firsts.append(first)
        else:
            a = leaf
            name = numpy_name(a.dtype)
            if name is None:
                raise error_at(
                    i,
                    f"numpy dtype {a.dtype} is not supported (numeric and bool types, native byte order)",
                )
            addr = a.__array_interface__["data"][0]
            if a.size:
                lo = addr + sum((d - 1) * s for d, s in zip(a.shape, a.strides) if s < 0)
                hi = (
                    addr
                    + a.itemsize
                    + sum((d - 1) * s for d, s in zip(a.shape, a.strides) if s > 0)
                )
            else:
                lo = hi = addr
            rows.append(["numpy", 0, name, list(a.shape), list(a.strides), 0, 0])
            firsts.append(addr)
            np_items.append((lo, hi, i, addr))
            np_owner[i] = a

    # numpy: merge overlapping byte ranges into storages; empty arrays hold no bytes
    # and get a storage of their own without interrupting a run of overlaps.
    np_items.sort()
    cur: list[Any] | None = None
    for lo, hi, i, _addr in np_items:
        if hi == lo:
            groups[("numpy", i)] = [np_owner[i], None, lo, lo, lo, [i]]
            order.append(("numpy", i))
            continue
        if cur is not None and lo < cur[4]:
            cur[4] = max(cur[4], hi)
            cur[5].append(i)
            continue
        # Start the span at a 16-byte boundary, as the original memory was, when the
        # bytes before it belong to the same allocation: loaded arrays keep alignment.
        start = max(lo - lo % _SPAN_ALIGN, _allocation_start(np_owner[i], lo))
        key = ("numpy", i)
        cur = groups[key] = [np_owner[i], None, start, lo, hi, [i]]
        order.append(key)

    storages: list[list[Any]] = []
    ptrs: list[int] = []
    sizes: list[int] = []
    keepalive: list[Any] = []
    for s, key in enumerate(order):
        owner, device, ptr, lo, hi, members = groups[key]
        if device is None:  # numpy: ptr/hi are addresses
            base, nbytes = ptr, hi - ptr
            dev = "cpu"
            for i in members:
                rows[i][1] = s
                rows[i][5] = firsts[i] - base if nbytes else 0
            keepalive.append(owner)
        else:
            if lo is None:
                lo = hi = 0
            lo -= lo % _SPAN_ALIGN
            nbytes = hi - lo
            dev = str(device)
            for i in members:
                rows[i][1] = s
                off = firsts[i] - lo
                rows[i][5] = off if 0 <= off <= nbytes else 0
            # A device address for CUDA storages: the writer drains them through
            # pinned staging buffers, never a host copy of the whole span.
            base = ptr + lo
            keepalive.append(owner)
        storages.append([0, nbytes, dev])
        ptrs.append(base)
        sizes.append(nbytes)
    offs = storage_offsets(sizes)
    for row, off in zip(storages, offs):
        row[0] = off
    return SavePlan(
        tensors=rows,
        storages=storages,
        ptrs=np.array(ptrs, dtype=np.uint64),
        nbytes=np.array(sizes, dtype=np.uint64),
        offsets=np.array(offs, dtype=np.uint64),
        keepalive=keepalive,
    )


def _allocation_start(a: np.ndarray, lo: int) -> int:
    """The lowest address of the memory that `a` views and that is safe to read: its
    root array's start when that array owns plain forward memory, else `lo`."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    start = int(root.__array_interface__["data"][0])
    if root.base is not None or not root.flags.c_contiguous or start > lo:
        return lo
    return start
