"""tensorfile: fast, safe save and load of tensors and checkpoints, a drop-in for torch.save/torch.load."""

from __future__ import annotations

from ._async import async_save
from ._errors import ChecksumError, FormatError
from .api import TensorFile, clean, load, open, save, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "FormatError",
    "TensorFile",
    "__version__",
    "async_save",
    "clean",
    "load",
    "open",
    "save",
    "save_safetensors",
]
