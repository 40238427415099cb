"""Leaves -> storages (aliasing found, byte spans computed) -> the tensor table and a write plan."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable

import numpy as np

from . import _engine, _numpy, _torch
from ._dtypes import numpy_name
from ._torch import describe, dtype_info
from ._tree import SURROGATE, Flattener, path_str
from .formats import FLAG_PARAMETER, FLAG_REQUIRES_GRAD, native, safetensors
from .formats.native import ALIGN, TensorTable

_SPAN_ALIGN = 16  # the widest element; keeps every tensor's offset a multiple of its size


class _Refused(Exception):
    pass


def _raise(message: str) -> TypeError:
    raise _Refused(message)


@dataclass
class SavePlan:
    table: TensorTable  # the header's tensor rows, as columns
    devices: list[str]  # device of each storage
    ptrs: np.ndarray  # uint64 address of each storage's bytes (on devices[i])
    nbytes: np.ndarray  # uint64
    offsets: np.ndarray  # uint64, relative to the data section
    keepalive: list[Any] = field(default_factory=list)  # per storage: the object owning its memory


@dataclass
class _Part:
    """Some of the leaves planned: their rows (storage indexes local to the part) and
    their storages."""

    table: TensorTable
    devices: list[str]
    ptrs: np.ndarray  # uint64
    nbytes: np.ndarray  # uint64
    keepalive: list[Any]

    def finish(self) -> SavePlan:
        # The canonical layout (storage_offsets): each storage at the aligned end of the
        # previous one, so the offsets are a running sum of aligned sizes.
        mask = np.uint64(ALIGN - 1)
        aligned = (self.nbytes + mask) & ~mask
        offsets = np.zeros(len(aligned), dtype=np.uint64)
        np.cumsum(aligned[:-1], out=offsets[1:])
        return SavePlan(self.table, self.devices, self.ptrs, self.nbytes, offsets, self.keepalive)

    @staticmethod
    def from_rows(
        rows: list[list[Any]], storages: list[list[Any]], ptrs: list[int], keepalive: list[Any]
    ) -> _Part:
        return _Part(
            TensorTable.from_rows(rows),
            [row[2] for row in storages],
            np.array(ptrs, dtype=np.uint64),
            np.array([row[1] for row in storages], dtype=np.uint64),
            keepalive,
        )

    @staticmethod
    def merge(n: int, parts: list[tuple[list[int], _Part]]) -> _Part:
        """One part from several, each covering the leaves at its positions; storages
        keep the parts' order."""
        names: list[str] = []
        kind = np.zeros(n, dtype=np.int8)
        storage = np.zeros(n, dtype=np.int64)
        dtype = np.zeros(n, dtype=np.int32)
        dim_begin = np.zeros(n, dtype=np.int64)
        ndim = np.zeros(n, dtype=np.int64)
        offset = np.zeros(n, dtype=np.int64)
        flags = np.zeros(n, dtype=np.int64)
        shapes, strides, devices, keepalive = [], [], [], []
        nstorage = ndims = 0
        for pos, p in parts:
            t = p.table
            code = np.array([_index(names, d) for d in t.dtype_names], dtype=np.int32)
            kind[pos] = t.kind
            storage[pos] = t.storage + nstorage
            dtype[pos] = code[t.dtype] if len(code) else t.dtype
            dim_begin[pos] = t.dim_begin + ndims
            ndim[pos] = t.ndim
            offset[pos] = t.offset
            flags[pos] = t.flags
            shapes.append(t.shapes)
            strides.append(t.strides)
            devices += p.devices
            keepalive += p.keepalive
            nstorage += len(p.devices)
            ndims += len(t.shapes)
        table = TensorTable(
            kind, storage, dtype, names, dim_begin, ndim,
            np.concatenate(shapes), np.concatenate(strides), offset, flags,
        )  # fmt: skip
        ptrs = np.concatenate([p.ptrs for _, p in parts])
        nbytes = np.concatenate([p.nbytes for _, p in parts])
        return _Part(table, devices, ptrs, nbytes, keepalive)


def _index(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)


_is_cpu = attrgetter("is_cpu")
_dtype = attrgetter("dtype")
_requires_grad = attrgetter("requires_grad")


def _describe_all(torch: Any, ts: list[Any]) -> _Part | None:
    """describe() and grouping for a whole list of tensors at once, in the common case:
    plain tensors and Parameters, dense, on the CPU, of dtypes the format holds, without
    the lazy conjugate/negative bits. Each attribute is read for all tensors in one pass
    of a C iterator, and the engine computes the table and the storages from those
    lists, so there is no Python code per tensor. Returns None when any tensor is outside
    that case: the caller then describes each one (and refuses what must be refused, with
    its message)."""
    tensor_cls, param_cls = torch.Tensor, torch.nn.Parameter
    types = list(map(type, ts))
    if not set(types) <= {tensor_cls, param_cls} or not all(map(_is_cpu, ts)):
        return None
    dtypes = list(map(_dtype, ts))
    code: dict[Any, int] = {}
    names: list[str] = []
    itemsizes: list[int] = []
    for dt in set(dtypes):
        info = dtype_info(dt)
        if info is None:
            return None
        code[dt] = len(names)
        names.append(info[0])
        itemsizes.append(info[1])
    if any(map(tensor_cls.is_neg, ts)):
        return None
    if any(dt.is_complex for dt in code) and any(map(tensor_cls.is_conj, ts)):
        return None
    try:
        # Tensors of other layouts (sparse, mkldnn, nested) have no storage, and so no
        # data pointer: those raise here and take the per-tensor path.
        data_ptrs = list(map(tensor_cls.data_ptr, ts))
        sizes = list(map(tensor_cls.size, ts))
        strides = list(map(tensor_cls.stride, ts))
    except RuntimeError:
        return None
    columns = _engine.plan_tensors(
        sizes, strides, data_ptrs, list(map(tensor_cls.storage_offset, ts)),
        list(map(_requires_grad, ts)), dtypes, code, itemsizes, types, param_cls,
        FLAG_PARAMETER, FLAG_REQUIRES_GRAD, lambda i: ts[i].untyped_storage().data_ptr(),
        _SPAN_ALIGN,
    )  # fmt: skip
    if columns is None:
        return None
    dtype, dim_begin, ndim, shape, stride, offset, flags, storage, lead, ptrs, nbytes = columns
    table = TensorTable(
        kind=np.zeros(len(ts), dtype=np.int8),
        storage=storage,
        dtype=dtype,
        dtype_names=names,
        dim_begin=dim_begin,
        ndim=ndim,
        shapes=shape,
        strides=stride,
        offset=offset,
        flags=flags,
    )
    # One per storage, as _plan_rows keeps them; without sharing, every tensor leads.
    owners = list(ts) if len(lead) == len(ts) else [ts[i] for i in lead.tolist()]
    return _Part(table, ["cpu"] * len(lead), ptrs, nbytes, owners)


def plan_save(leaves: list[Any], error_at: Callable[[int, str], TypeError]) -> SavePlan:
    """Groups leaves by the memory they share and lays the storages out. Storages of
    torch tensors keep torch's sharing (one storage, one region); numpy arrays share a
    region when their bytes overlap. Only the span of a storage that some tensor
    references is written. Torch storages come first, in order of first use. A tensor
    with more dimensions than the format holds is refused (never write what the reader
    refuses)."""
    plan = _plan_leaves(leaves, error_at)
    ndim = plan.table.ndim
    if len(ndim) and int(ndim.max()) > native.MAX_NDIM:
        i = int(np.argmax(ndim > native.MAX_NDIM))
        raise error_at(
            i, f"it has {int(ndim[i])} dimensions; the format holds at most {native.MAX_NDIM}"
        )
    return plan


def _plan_leaves(leaves: list[Any], error_at: Callable[[int, str], TypeError]) -> SavePlan:
    torch = sys.modules.get("torch")
    everything = list(range(len(leaves)))
    if torch is None or not leaves:
        return _plan_rows(torch, leaves, everything, error_at).finish()
    if set(map(type, leaves)) <= {torch.Tensor, torch.nn.Parameter}:
        fast = _describe_all(torch, leaves)
        return (fast or _plan_rows(torch, leaves, everything, error_at)).finish()
    tensor_type = torch.Tensor
    t_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, tensor_type)]
    fast = _describe_all(torch, [leaves[i] for i in t_pos]) if t_pos else None
    if fast is None:
        return _plan_rows(torch, leaves, everything, error_at).finish()
    n_pos = sorted(set(range(len(leaves))) - set(t_pos))
    rest = _plan_rows(torch, [leaves[i] for i in n_pos], n_pos, error_at)
    return _Part.merge(len(leaves), [(t_pos, fast), (n_pos, rest)]).finish()


def _plan_rows(
    torch: Any, leaves: list[Any], positions: list[int], error_at: Callable[[int, str], TypeError]
) -> _Part:
    """describe() and grouping one leaf at a time: every case the vectorised path leaves
    out (numpy arrays, CUDA tensors, refusals with their messages)."""
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
                raise error_at(positions[i], str(e)) from None
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
                    positions[i],
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
    return _Part.from_rows(rows, storages, ptrs, keepalive)


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


def plan_and_encode(
    obj: Any,
    metadata: dict[str, str] | None,
    saved_from: dict[int, str] | None = None,
    choose_refs: Callable[[SavePlan], dict[int, tuple[str, int]]] | None = None,
) -> tuple[SavePlan, bytearray, int]:
    """Everything a save does per tensor before bytes move: flatten the object, plan the
    storages, encode the header. Returns (plan, header, position of its CRC field). Call
    with the collector paused (no_gc), as save does."""
    meta = check_metadata(metadata)
    flattener = Flattener()
    tree = flattener.flatten(obj)
    plan = plan_save(
        flattener.leaves,
        lambda i, m: TypeError(
            f"tensorfile.save: cannot save the object at key path {path_str(flattener.leaf_paths[i])!r}: {m}"
        ),
    )
    recorded = plan.devices  # what the header says; the bytes are written from plan.devices
    if saved_from:
        recorded = list(recorded)
        for i, leaf in enumerate(flattener.leaves):
            device = saved_from.get(id(leaf))
            if device is not None:
                recorded[int(plan.table.storage[i])] = device
    refs = choose_refs(plan) if choose_refs is not None else {}
    if refs:  # their bytes stay where they are: they take no room in this file
        plan.offsets = native.canonical_offsets(plan.nbytes, refs)
    header, crc_pos = native.encode_header(
        tree, plan.table, plan.offsets, plan.nbytes, recorded, meta, refs
    )
    if len(header) > native.MAX_HEADER_NBYTES:
        raise ValueError(
            f"tensorfile.save: the header would be {len(header)} bytes, over the format's limit"
        )
    return plan, header, crc_pos


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if isinstance(metadata, dict) and any(
        SURROGATE.search(k + v) for k, v in metadata.items() if type(k) is str and type(v) is str
    ):
        raise TypeError("tensorfile.save: metadata strings must not contain unpaired surrogates")
    if not isinstance(metadata, dict) or not all(
        type(k) is str and type(v) is str for k, v in metadata.items()
    ):
        raise TypeError("tensorfile.save: metadata must be a dict of str to str")
    return dict(metadata)


@dataclass
class SafetensorsPlan:
    head: bytes  # the 8-byte length and the JSON header
    total: int  # file size
    regions: tuple[np.ndarray, np.ndarray, np.ndarray]  # ptrs, nbytes, file offsets (non-empty)
    keep: list[Any]  # owners of the bytes (contiguous copies included)


def plan_safetensors(
    tensors: dict[str, Any], metadata: dict[str, str], copy_shared: bool
) -> SafetensorsPlan:
    """A safetensors file of a flat str -> tensor dict (torch tensors or numpy arrays).
    Tensors whose memory overlaps are refused, as safetensors refuses them, unless
    `copy_shared`; they are laid out widest element first, then by name, so every tensor
    is aligned to its element."""
    rows: list[
        tuple[int, str, str, list[int], int, int]
    ] = []  # -itemsize, name, dtype, shape, nbytes, ptr
    spans: list[tuple[int, int, str]] = []
    keep: list[Any] = []
    torch = sys.modules.get("torch")
    for name, t in tensors.items():
        if type(name) is not str:
            raise TypeError(f"tensorfile.save_safetensors: key {name!r} is not a str")

        def refuse(why: str, name: str = name) -> TypeError:
            return TypeError(f"tensorfile.save_safetensors: cannot save {name!r}: {why}")

        if torch is not None and isinstance(t, torch.Tensor):
            entry = _torch.flat_entry(torch, t, safetensors.NAME_OF.__contains__, refuse)
        elif isinstance(t, np.ndarray):
            entry = _numpy.flat_entry(t, safetensors.numpy_supported, refuse)
        else:
            raise refuse(f"expected a tensor or numpy array, got {type(t).__name__}")
        dtype, shape, nbytes, ptr, span, data = entry
        keep.append(data)
        itemsize = nbytes // max(1, math.prod(shape)) if nbytes else 0
        rows.append((-itemsize, name, dtype, shape, nbytes, ptr))
        if span[1] > span[0]:
            spans.append((span[0], span[1], name))
    spans.sort()
    for (_, hi, a), (lo, _, b) in zip(spans, spans[1:]):
        if lo < hi and not copy_shared:
            raise ValueError(
                f"tensorfile.save_safetensors: tensors {a!r} and {b!r} share memory, which safetensors "
                "cannot express; pass copy_shared=True to store a copy of each, or clone one of them"
            )
    rows.sort(key=lambda r: (r[0], r[1]))
    head, offsets = safetensors.encode_header([(r[1], r[2], r[3], r[4]) for r in rows], metadata)
    total = len(head) + sum(r[4] for r in rows)
    ptrs = np.array([r[5] for r in rows], dtype=np.uint64)
    sizes = np.array([r[4] for r in rows], dtype=np.uint64)
    offs = np.array(offsets, dtype=np.uint64) + np.uint64(len(head))
    full = sizes > 0
    return SafetensorsPlan(head, total, (ptrs[full], sizes[full], offs[full]), keep)
