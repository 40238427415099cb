"""tensorfile: fast, safe save and load of tensors and checkpoints, a drop-in for torch.save/torch.load."""

from __future__ import annotations

from ._async import async_save
from ._cuda import cuda_available
from ._errors import ChecksumError, CudaError, FormatError
from ._files import clean
from .api import TensorFile, load, open, save, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "CudaError",
    "FormatError",
    "TensorFile",
    "__version__",
    "async_save",
    "clean",
    "cuda_available",
    "load",
    "open",
    "save",
    "save_safetensors",
]
