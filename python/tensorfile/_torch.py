"""torch adapter: tensor <-> (dtype name, shape, strides, storage, byte offset, flags);
destinations for a load, tensors as views of them, and torch.load's map_location rules."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ._dtypes import TORCH_ITEMSIZE
from .formats import FLAG_PARAMETER, FLAG_REQUIRES_GRAD

if TYPE_CHECKING:
    from .formats import Layout

_names: dict[Any, tuple[str, int]] = {}


def dtype_info(dtype: Any) -> tuple[str, int] | None:
    """(header name, itemsize) of a torch dtype, or None if the format cannot hold it."""
    info = _names.get(dtype)
    if info is None:
        name = str(dtype)[6:]
        if name not in TORCH_ITEMSIZE:
            return None
        info = _names[dtype] = (name, TORCH_ITEMSIZE[name])
    return info


def describe(
    torch: Any, t: Any, error: Callable[[str], TypeError]
) -> tuple[Any, Any, int, int, int, str, Any, Any, int]:
    """For one tensor: (grouping key, storage, its data pointer, first byte, end byte,
    dtype name, shape, strides, flags). This runs once per tensor on every save, so the
    common case (a dense CPU tensor) costs a handful of attribute reads."""
    cls = type(t)
    if cls is torch.Tensor:
        flags = 0
    elif cls is torch.nn.Parameter:
        flags = FLAG_PARAMETER
    else:
        raise error(
            f"tensor subclass {cls.__module__}.{cls.__qualname__} is not supported; save a plain tensor"
        )
    if t.layout is not torch.strided:
        raise error(f"{t.layout} tensors are not supported; save a dense (strided) tensor")
    if not t.is_cpu and not t.is_cuda:
        if t.is_meta:
            raise error("meta tensors have no data to save")
        raise error(f"tensors on {t.device} are not supported (CPU and CUDA tensors are)")
    info = dtype_info(t.dtype)
    if info is None:
        if t.is_quantized:
            raise error("quantized tensors are not supported")
        raise error(f"dtype {t.dtype} is not supported")
    if t.requires_grad:
        flags |= FLAG_REQUIRES_GRAD
    if t.is_conj() or t.is_neg():
        # The lazy conjugate/negative bit is not part of the format; store the values.
        t = t.resolve_conj().resolve_neg()
    name, itemsize = info
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    shape = t.shape
    strides = t.stride()
    first = t.storage_offset() * itemsize
    if t.is_contiguous():
        end = first + t.nbytes
    elif t.numel():
        end = first + itemsize
        for d, s in zip(shape, strides):
            end += (d - 1) * s * itemsize
    else:
        end = first
    if not ptr:
        key: Any = id(t)  # storages without memory share nothing
    elif t.is_cpu:
        key = ptr
    else:
        key = (str(t.device), ptr)
    return key, storage, ptr, first, end, name, shape, strides, flags


# --------------------------------------------------------------------------- loading


def module(name: str) -> Any:
    """torch, imported on first need; `name` is the file that needs it."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            raise ImportError(f"{name} holds torch tensors: install torch to load it") from None
    return torch


class Prebuilt(dict[int, Any]):
    """{storage index: storage}, where the storages in `prebuilt` are instead their one
    tensor, allocated with its shape before the read (see `allocate`)."""

    prebuilt: set[int]


_DTYPES: dict[str, Any] = {}
# dtypes that torch.empty_strided allocates (sub-byte and bit types it may not); bool is
# left out because its bytes are checked through a uint8 view of the storage.
_PREBUILT_DTYPES = frozenset(
    "float16 bfloat16 float32 float64 complex64 complex128 uint8 int8 int16 int32 int64".split()
)


def dtype_of(torch: Any, name: str) -> Any:
    dt = _DTYPES.get(name)
    if dt is None:
        dt = _DTYPES[name] = getattr(torch, name)
    return dt


def _prebuilt_rows(lay: Layout, idx: list[int]) -> dict[int, int]:
    """{storage: its one tensor row} for the torch storages whose single tensor starts at
    byte 0 and spans the whole storage: those tensors are allocated directly with their
    shape and strides (one call instead of a storage, an empty tensor and set_), and the
    read lands in them. Bool rows are left out: their bytes are checked on the storage."""
    rows = lay.tensors
    nbytes = lay.storage_nbytes.tolist()
    out: dict[int, int] = {}
    for s in idx:
        members = lay.storage_tensors[s]
        if len(members) == 1 and lay.storage_kind[s] == "torch":
            row = rows[members[0]]
            if row.offset == 0 and row.dtype in _PREBUILT_DTYPES:
                # The read fills the whole storage, so the tensor's own allocation (what
                # empty_strided sizes from shape and strides) must be exactly that big: a
                # storage larger than its one view (torch.save keeps whole storages)
                # keeps the ordinary path.
                if 0 in row.shape:
                    need = 0
                else:
                    need = 1
                    for d, st in zip(row.shape, row.strides):
                        need += (d - 1) * st
                    need *= TORCH_ITEMSIZE[row.dtype]
                if need == nbytes[s]:
                    out[s] = members[0]
    return out


def allocate(
    torch: Any, lay: Layout, idx: list[int], prebuild: bool, pin_memory: bool
) -> tuple[dict[int, Any], np.ndarray]:
    """Fresh CPU destinations for the torch storages of `idx` (numpy ones are left to
    the caller): ({storage: UntypedStorage, or with `prebuild` its one tensor}, the
    address of each of `idx`, 0 where not allocated here)."""
    bufs: dict[int, Any] = {}
    ptrs = np.zeros(len(idx), dtype=np.uint64)
    single = _prebuilt_rows(lay, idx) if prebuild else {}
    if single:
        bufs = Prebuilt()
        bufs.prebuilt = set(single)
        empty_strided = torch.empty_strided
        rows = lay.tensors
        for j, s in enumerate(idx):
            i = single.get(s)
            if i is None:
                continue
            row = rows[i]
            t = bufs[s] = empty_strided(row.shape, row.strides, dtype=dtype_of(torch, row.dtype))
            ptrs[j] = t.data_ptr()
    for j, s in enumerate(idx):
        if s in bufs or lay.storage_kind[s] != "torch":
            continue
        nb = int(lay.storage_nbytes[s])
        if pin_memory:
            st = torch.empty(nb, dtype=torch.uint8, pin_memory=True).untyped_storage()
        else:
            st = torch.UntypedStorage(nb)
        bufs[s] = st
        ptrs[j] = st.data_ptr()
    return bufs, ptrs


def view(torch: Any, row: Any, storage: Any) -> Any:
    """The tensor of a torch row over its storage, as a Parameter or requiring grad as
    the row's flags say."""
    dt = dtype_of(torch, row.dtype)
    out = torch.empty(0, dtype=dt, device=storage.device).set_(
        storage, row.offset // dt.itemsize, row.shape, row.strides
    )
    return with_flags(torch, out, row.flags)


def with_flags(torch: Any, t: Any, flags: int) -> Any:
    if flags & FLAG_PARAMETER:
        return torch.nn.Parameter(t, requires_grad=bool(flags & FLAG_REQUIRES_GRAD))
    if flags & FLAG_REQUIRES_GRAD:
        t.requires_grad_(True)
    return t


def raw_bytes(torch: Any, row: Any, storage: Any) -> Any:
    """A row's elements as one uint8 each (for a bool row: the bytes to check)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
        storage, row.offset, row.shape, row.strides
    )


def storage_over(torch: Any, buffer: Any) -> Any:
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()


def slice_storage(torch: Any, whole: Any, offset: int, nbytes: int) -> Any:
    """Bytes [offset, offset + nbytes) of `whole` as a storage that keeps it alive: no
    buffer export and no tensor per storage (for 20,000 storages of a mapped file, a
    uint8 tensor each was some 10 MiB of peak RSS)."""
    if not nbytes or whole is None:
        return torch.UntypedStorage(0)
    return whole[offset : offset + nbytes]


# --------------------------------------------------------------------------- map_location


def mapped_location(saved: str, map_location: Any) -> str:
    """Where a storage saved on `saved` goes under a non-callable map_location, as in
    torch.load: None keeps it, a dict remaps saved device strings, anything else (a
    string or torch.device) sends every storage there."""
    if map_location is None:
        return saved
    if isinstance(map_location, dict):
        return str(map_location.get(saved, saved))
    return str(map_location)


def _is_callable(torch: Any, map_location: Any) -> bool:
    return callable(map_location) and not isinstance(
        map_location, (str, dict) if torch is None else (str, dict, torch.device)
    )


def target_devices(
    torch: Any, saved: Sequence[str], kinds: Sequence[str], idx: Sequence[int], map_location: Any
) -> dict[int, Any]:
    """{storage index: torch.device} for the storages of `idx` that map_location sends
    to CUDA and that can be read there directly. Callables are left out: as in
    torch.load they receive the storage on the CPU and decide for themselves."""
    if _is_callable(torch, map_location):
        return {}
    out: dict[int, Any] = {}
    cache: dict[str, Any] = {}
    for s in idx:
        if kinds[s] != "torch":
            continue
        where = saved[s]
        dev = cache.get(where)
        if dev is None:
            dev = cache[where] = torch.device(mapped_location(where, map_location))
        if dev.type == "cuda":
            out[s] = dev
    return out


def stays_on_cpu(lay: Layout, map_location: Any) -> bool:
    """True when map_location leaves every torch storage on the CPU as read (no copy, no
    callable), so tensors may be allocated before the read."""
    if map_location is None:
        return all(d == "cpu" for d in set(lay.storage_device))
    torch = sys.modules.get("torch")
    if isinstance(map_location, str) or (
        torch is not None and isinstance(map_location, torch.device)
    ):
        return str(map_location) == "cpu"
    return False


def check_device(name: str, torch: Any, target: str) -> None:
    """Raises torch.load's errors for a CUDA device that is missing here, and a clear one
    for any other device type this process cannot use."""
    dev = torch.device(target)
    if dev.type not in ("cpu", "cuda", "meta"):
        backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise RuntimeError(
                f"{name}: a storage is meant for {target}, which is not available here; "
                "pass map_location='cpu' (or a dict or callable) to load it elsewhere"
            )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{name}: a storage is meant for {target} but CUDA is not available here; "
                "pass map_location='cpu' (or a dict or callable) to load it on the CPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{name}: a storage is meant for {target} but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; pass map_location to put it elsewhere"
            )


def check_devices(name: str, lay: Layout, idx: Sequence[int], map_location: Any) -> set[int]:
    """Before any read: fails if map_location (None: the saved devices) sends a torch
    storage of `idx` to a CUDA device this process cannot use, saying what the caller
    asked; returns the storages it sends to the meta device (made there, never read)."""
    if _is_callable(sys.modules.get("torch"), map_location):
        return set()  # a callable decides storage by storage, on the CPU, as in torch.load
    kinds, devices = lay.storage_kind, lay.storage_device
    saved = {devices[s] for s in idx if kinds[s] == "torch"}
    to_meta = set()
    for where in sorted(saved):
        target = mapped_location(where, map_location)
        if target.partition(":")[0] == "meta":
            to_meta.add(where)
        if target.partition(":")[0] in ("cpu", "meta"):
            continue
        try:
            check_device(name, module(name), target)
        except RuntimeError as e:
            if map_location is None:
                asked = f"it was saved from {where}, and map_location=None keeps the saved device"
            elif isinstance(map_location, dict):
                asked = (
                    f"it was saved from {where}, and map_location={map_location!r} maps it there"
                )
            else:
                asked = f"map_location={map_location!r} sends every storage there"
            raise RuntimeError(f"{e} ({asked})") from None
    return {s for s in idx if kinds[s] == "torch" and devices[s] in to_meta}


def meta_storage(name: str, nbytes: int) -> Any:
    return module(name).UntypedStorage(nbytes, device="meta")


def _to_device(name: str, storage: Any, target: str) -> Any:
    torch = module(name)
    dev = torch.device(target)
    if dev.type == "cpu":
        return storage
    check_device(name, torch, target)
    return storage.to(device=dev)


def placer(lay: Layout, name: str, map_location: Any) -> Callable[[int, Any], Any]:
    """Returns place(s, host storage) -> the storage the tensors will view, on the device
    that map_location picks for storage s, with torch.load's semantics: None keeps the
    saved device, a string or torch.device sends everything there, a dict remaps saved
    device strings, and a callable(storage, location) returns the storage to use (None
    for the default)."""
    targets: dict[str, str] = {}

    def target_of(saved: str) -> str:
        t = targets.get(saved)
        if t is None:
            where = mapped_location(saved, map_location)
            t = targets[saved] = str(module(name).device(where))
        return t

    is_callable = _is_callable(sys.modules.get("torch"), map_location)

    def place(s: int, buf: Any) -> Any:
        if lay.storage_kind[s] == "numpy":
            return buf
        saved = lay.storage_device[s]
        if is_callable:
            result = map_location(buf, saved)
            if result is None:
                return _to_device(name, buf, saved)
            tm = module(name)
            if isinstance(result, tm.TypedStorage):
                result = result.untyped()
            if not isinstance(result, tm.UntypedStorage):
                raise TypeError(
                    f"map_location callable returned {type(result).__name__}, expected a storage"
                )
            return result
        target = target_of(saved)
        return buf if target == "cpu" else _to_device(name, buf, target)

    return place


# --------------------------------------------------------------------------- saving


def host_copies(
    devices: Sequence[str], ptrs: np.ndarray, nbytes: np.ndarray, owners: Sequence[Any]
) -> tuple[np.ndarray, list[Any]]:
    """For writing to a stream, which needs host bytes: the plan's pointers with every
    device region replaced by a host copy of it (returned too, to keep alive). `owners`
    are the plan's storages, one per region."""
    if all(d == "cpu" for d in devices):
        return ptrs, []
    import torch

    out = ptrs.copy()
    keep = []
    for i, d in enumerate(devices):
        if d != "cpu" and nbytes[i]:
            owner = owners[i]
            lo = int(ptrs[i]) - owner.data_ptr()
            host = (
                torch.empty(0, dtype=torch.uint8, device=owner.device)
                .set_(owner, lo, (int(nbytes[i]),), (1,))
                .cpu()
            )
            keep.append(host)
            out[i] = host.data_ptr()
    return out, keep


def flat_entry(
    torch: Any, t: Any, supported: Callable[[str], bool], refuse: Callable[[str], TypeError]
) -> tuple[str, list[int], int, int, tuple[int, int], Any]:
    """(dtype name, shape, nbytes, address of contiguous bytes, (lo, hi) memory span of
    the original, owner of the bytes) of a tensor written as one flat entry (safetensors);
    a non-contiguous, conjugate or negative view is written from a contiguous copy."""
    if t.layout is not torch.strided or t.is_quantized:
        raise refuse(f"{t.layout} / quantized tensors are not supported")
    dtype = str(t.dtype).removeprefix("torch.")
    if not supported(dtype):
        raise refuse(f"safetensors has no dtype for {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    span = (0, 0)
    if t.numel():
        lo = t.data_ptr()
        hi = lo + t.element_size() * (1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride())))
        span = (lo, hi)
    if t.is_conj() or t.is_neg() or not t.is_contiguous():
        t = t.resolve_conj().resolve_neg().contiguous()
    return dtype, list(t.shape), t.numel() * t.element_size(), t.data_ptr(), span, t
