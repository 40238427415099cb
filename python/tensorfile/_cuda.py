"""CUDA transfers: finding libcudart and libcufile, and moving bytes between files and
CUDA memory through the engine's pinned staging pipeline or GPUDirect Storage."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
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


# Where the nvidia-* wheels put libcudart: CUDA 13's single directory, then CUDA 12's
# per-component one.
_CUDART_WHEEL_FILES = (
    "nvidia/cu13/lib/libcudart.so.13",
    "nvidia/cuda_runtime/lib/libcudart.so.13",
    "nvidia/cuda_runtime/lib/libcudart.so.12",
    "nvidia/cu12/lib/libcudart.so.12",
)


def _runtime_candidates() -> list[str]:
    """libcudart files to try, best first: the one mapped into this process already
    (torch's), those of the nvidia-* wheels on sys.path, then "" (the engine's own search:
    already loaded by soname, then the system loader)."""
    found = [_mapped_library("libcudart.so")]
    for root in sys.path:
        for sub in _CUDART_WHEEL_FILES:
            path = os.path.join(root or ".", sub)
            if os.path.isfile(path):
                found.append(path)
    return [p for p in dict.fromkeys(found) if p] + [""]


def _load_runtime() -> bool:
    """Opens libcudart (once one has opened, this is free). A failure is not kept: a
    later call, e.g. after `import torch` has loaded a runtime, looks again."""
    return any(_engine.cuda_load(path) for path in _runtime_candidates())


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


def _cufile_log_settings() -> None:
    """libcufile writes cufile.log into the working directory on every driver open unless
    told otherwise (CUFILE_LOGFILE_PATH, or the "logging" section of the cufile.json that
    CUFILE_ENV_PATH_JSON names): point it into a per-user directory under the system's
    temporary directory, unless the user has chosen either."""
    if "CUFILE_LOGFILE_PATH" in os.environ or "CUFILE_ENV_PATH_JSON" in os.environ:
        return
    where = os.path.join(tempfile.gettempdir(), f"tensorfile-{os.getuid()}")
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
    except OSError:
        return
    os.environ["CUFILE_LOGFILE_PATH"] = os.path.join(where, "cufile.log")


def _cuda_driver_present() -> bool:
    """Whether the CUDA driver library (libcuda.so.1) can be loaded. cuFile 1.20's
    cuFileDriverOpen spins forever without one (older versions return an error)."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
        return True
    except OSError:
        pass
    try:
        ctypes.CDLL("libcuda.so.1", mode=os.RTLD_LOCAL)
        return True
    except OSError:
        return False


def _load_cufile() -> bool:
    global _cufile_state
    if _cufile_state is None:
        _load_runtime()  # cuFile needs the CUDA driver initialised by the runtime
        _cufile_log_settings()  # read by libcufile when it opens its driver
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
    elif _cufile_state is None and not _cuda_driver_present():
        # Never opened without a driver: cuFileDriverOpen would not return.
        why = "the CUDA driver (libcuda.so.1) is not present"
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
    """The CUDA device index of a device string such as "cuda:1"; a plain "cuda" is
    torch's current device, as torch itself reads it (not 0: a process using only
    cuda:1 must not touch 0)."""
    if ":" in device:
        return int(device.split(":", 1)[1])
    import torch

    return int(torch.cuda.current_device())
