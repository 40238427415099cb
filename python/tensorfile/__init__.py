"""tensorfile: fast, safe save and load of tensors and checkpoints, a drop-in for torch.save/torch.load."""

from __future__ import annotations

from ._async import SaveFuture, async_save
from ._async import clear_pool as release_async_buffers
from ._cuda import cuda_available
from ._cuda import release_staging as release_staging_buffers
from ._errors import ChecksumError, CudaError, FormatError
from ._files import clean
from ._io import read_regions_to_device, write_regions_from_device
from ._manager import CheckpointManager
from .api import TensorFile, load, load_model, open, save, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "ChecksumError",
    "CudaError",
    "FormatError",
    "SaveFuture",
    "TensorFile",
    "__version__",
    "async_save",
    "clean",
    "cuda_available",
    "load",
    "load_model",
    "open",
    "read_regions_to_device",
    "release_async_buffers",
    "release_staging_buffers",
    "save",
    "save_safetensors",
    "write_regions_from_device",
]
