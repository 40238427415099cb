"""Element types the format knows, by the name written in the header, with byte widths."""

from __future__ import annotations

import numpy as np

# torch dtype name (without the "torch." prefix) -> bytes per element. Every dtype of
# torch 2.1-2.13 that holds plain bytes; quantized dtypes need a quantizer and are refused.
TORCH_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    "bits8": 1,
    "bits16": 2,
    **{f"uint{n}": 1 for n in range(1, 8)},
    **{f"int{n}": 1 for n in range(1, 8)},
}

# torch dtypes that may carry requires_grad (torch's own rule: floating and complex).
TORCH_GRAD_DTYPES = frozenset(
    n for n in TORCH_ITEMSIZE if n.startswith(("float", "bfloat", "complex"))
)

# Every torch dtype name a dtype *value* in the object tree may have: the storable ones
# and the quantized ones, which are fine as values even though their tensors are refused.
TORCH_DTYPE_VALUES = frozenset(TORCH_ITEMSIZE) | {
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
}

# numpy dtype name -> bytes per element: every numeric and bool type with a fixed,
# platform-independent width (little-endian in the file).
NUMPY_ITEMSIZE: dict[str, int] = {
    name: np.dtype(name).itemsize
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}

ITEMSIZE = {"torch": TORCH_ITEMSIZE, "numpy": NUMPY_ITEMSIZE}


def numpy_name(dtype: np.dtype) -> str | None:
    """The header name of a numpy dtype, or None if the format cannot hold it."""
    if dtype.byteorder == ">" or dtype.fields is not None or dtype.subdtype is not None:
        return None
    name = dtype.name
    return name if name in NUMPY_ITEMSIZE else None
