"""torch adapter: tensor <-> (dtype name, shape, strides, storage, byte offset, flags)."""

from __future__ import annotations

from typing import Any

from ._dtypes import TORCH_ITEMSIZE

FLAG_REQUIRES_GRAD = 1
FLAG_PARAMETER = 2


def describe(torch: Any, t: Any, error: Any) -> tuple[Any, Any, int, int, int, str, list[int], list[int], int]:
    """For one tensor: (grouping key, storage, its data pointer, first byte, end byte,
    dtype name, shape, strides, flags). `error(msg)` builds the TypeError to raise."""
    cls = type(t)
    if cls is torch.nn.Parameter:
        flags = FLAG_PARAMETER
    elif cls is torch.Tensor:
        flags = 0
    else:
        raise error(f"tensor subclass {cls.__module__}.{cls.__qualname__} is not supported; save a plain tensor")
    if t.layout is not torch.strided:
        raise error(f"{t.layout} tensors are not supported; save a dense (strided) tensor")
    if t.is_quantized:
        raise error("quantized tensors are not supported")
    if t.device.type == "meta":
        raise error("meta tensors have no data to save")
    if t.requires_grad:
        flags |= FLAG_REQUIRES_GRAD
    if t.is_conj() or t.is_neg():
        # The lazy conjugate/negative bit is not part of the format; store the values.
        t = t.resolve_conj().resolve_neg()
    dtype = str(t.dtype)[6:]
    itemsize = TORCH_ITEMSIZE.get(dtype)
    if itemsize is None:
        raise error(f"dtype {t.dtype} is not supported")
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    shape = list(t.shape)
    strides = list(t.stride())
    first = t.storage_offset() * itemsize
    end = first
    if t.numel():
        end = first + itemsize * (1 + sum((d - 1) * s for d, s in zip(shape, strides)))
    key = (t.device, ptr) if ptr else id(t)
    return key, storage, ptr, first, end, dtype, shape, strides, flags
