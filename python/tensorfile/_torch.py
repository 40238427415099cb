"""torch adapter: tensor <-> (dtype name, shape, strides, storage, byte offset, flags)."""

from __future__ import annotations

from typing import Any, Callable

from ._dtypes import TORCH_ITEMSIZE

FLAG_REQUIRES_GRAD = 1
FLAG_PARAMETER = 2

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
