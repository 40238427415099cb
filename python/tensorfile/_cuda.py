"""CUDA transfers: finding libcudart and libcufile, and moving bytes between files and
CUDA memory through the engine's pinned staging pipeline or GPUDirect Storage."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import numpy as np

from . import _config, _engine
from ._errors import CudaError

log = logging.getLogger("tensorfile")

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_NVIDIA_FS = "/proc/driver/nvidia-fs"
_cufile_state: bool | None = None


def _mapped_library(prefix: str) -> str:
    """The path of a shared library whose file name starts with `prefix` and that is
    mapped into this process already ("" when none): torch's own libcudart, so that we
    share its runtime instead of loading a second one."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                slash = line.find("/")
                if slash >= 0:
                    path = line[slash:].strip()
                    if os.path.basename(path).startswith(prefix):
                        return path
    except OSError:
        pass
    return ""


def _load_runtime() -> bool:
    return bool(_engine.cuda_load(_mapped_library("libcudart.so")))


def cuda_available() -> bool:
    """True when torch sees a CUDA device and the CUDA runtime can be opened, so that
    loads to and saves from CUDA go through tensorfile's pipeline. Never raises."""
    try:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old drivers here
            if not torch.cuda.is_available():
                return False
        return _load_runtime() and bool(_engine.cuda_available())
    except Exception:
        return False


def _cufile_candidates() -> list[str]:
    """libcufile from the nvidia-cufile wheel (its layout changed with CUDA 13), then the
    loader's search path."""
    found = []
    for root in sys.path:
        for sub in ("nvidia/cufile/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            path = os.path.join(root or ".", sub, "libcufile.so.0")
            if os.path.isfile(path):
                found.append(path)
    found.append("")  # the engine then tries libcufile.so.0 by name
    return found


def _load_cufile() -> bool:
    global _cufile_state
    if _cufile_state is None:
        _load_runtime()  # cuFile needs the CUDA driver initialised by the runtime
        _cufile_state = bool(_engine.cufile_load(_cufile_candidates()[0]))
    return _cufile_state


def _gds_open(path: str, write: bool, mode: str, name: str = "") -> int:
    """An O_DIRECT descriptor of `path` for cuFile, or -1 to use staging. With mode "on"
    any reason that GPUDirect Storage cannot be used raises (cuFile's compatibility mode
    is accepted); with "auto" it is logged at debug level, and GPUDirect is used only
    where the nvidia-fs driver is loaded. `name` names the file in messages."""
    if mode == "off":
        return -1
    why = ""
    if not _O_DIRECT:
        why = "O_DIRECT is not available on this platform"
    elif mode == "auto" and not os.path.exists(_NVIDIA_FS):
        # Without the nvidia-fs driver cuFile runs in compatibility mode: POSIX reads
        # through its own bounce buffers, slower than our overlapped staging.
        why = "the nvidia-fs driver is not loaded (cuFile would only emulate GPUDirect)"
    elif not _load_cufile():
        why = f"cuFile is unavailable: {_engine.cufile_error()}"
    else:
        flags = (os.O_WRONLY if write else os.O_RDONLY) | _O_DIRECT | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(path, flags)
        except OSError as e:
            why = f"cannot open {path} with O_DIRECT: {e.strerror}"
    if mode == "on":
        raise RuntimeError(
            f"{name or path}: TENSORFILE_GDS=on but GPUDirect Storage cannot be used: {why}"
        )
    log.debug("%s: GPUDirect Storage not used (%s); using pinned staging", name or path, why)
    return -1


def transfer(write: bool, path: str, gds_path: str | None, call: Any) -> np.ndarray:
    """Runs call(gds_fd) with GPUDirect Storage when TENSORFILE_GDS and the file allow it,
    else with staging; in auto mode a file that cuFile refuses falls back to staging."""
    mode = _config.gds() if gds_path else "off"
    gds_fd = _gds_open(gds_path, write, mode, path) if gds_path else -1
    if gds_fd < 0:
        return call(-1)
    try:
        return call(gds_fd)
    except CudaError as e:
        if mode == "on" or e.call != "cuFileHandleRegister":
            raise
        log.debug("%s: cuFile refused the file (%s); using pinned staging", path, e)
    finally:
        os.close(gds_fd)
    return call(-1)


def release_staging() -> None:
    """Frees the pinned staging buffers that CUDA transfers keep between calls."""
    torch = sys.modules.get("torch")
    if torch is None or not cuda_available():
        return
    for d in range(torch.cuda.device_count()):
        _engine.staging_trim("cuda", d)


def synchronize(device: int) -> None:
    """Waits for torch's queued work on `device`: fresh destinations may reuse memory
    that queued kernels still use, and sources may still be being computed."""
    import torch

    torch.cuda.synchronize(device)


def require_runtime(what: str = "") -> None:
    """Raises when torch reports CUDA but tensorfile cannot open the CUDA runtime."""
    if not _load_runtime():
        raise RuntimeError(
            f"tensorfile cannot open the CUDA runtime{' ' + what if what else ''}: {_engine.cuda_error()}"
        )


def device_index(torch: Any, device: Any) -> int:
    """The index of a CUDA torch.device; a plain "cuda" is the current device."""
    return device.index if device.index is not None else torch.cuda.current_device()


def saved_index(device: str) -> int:
    """The index of a recorded storage device such as "cuda:1" (a plain "cuda": 0)."""
    return int(device.split(":", 1)[1]) if ":" in device else 0
