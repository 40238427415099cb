"""CUDA transfers: finding libcudart and libcufile, and moving bytes between files and
CUDA memory through the engine's pinned staging pipeline or GPUDirect Storage."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
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


def _sorted(file_offsets: np.ndarray) -> np.ndarray | None:
    if len(file_offsets) < 2 or bool(np.all(file_offsets[1:] >= file_offsets[:-1])):
        return None
    return np.argsort(file_offsets, kind="stable")


def _transfer(write: bool, fd: int, path: str, gds_path: str | None, call: Any) -> np.ndarray:
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


def read_regions_to_device(
    fd: int,
    path: str,
    ptrs: Sequence[int] | np.ndarray,
    nbytes: Sequence[int] | np.ndarray,
    file_offsets: Sequence[int] | np.ndarray,
    device: int,
    *,
    checksum: bool = True,
    zero_ranges: Sequence[tuple[int, int]] = (),
    num_threads: int | None = None,
    gds_path: str | None = None,
    zip_crc: bool = False,
    backend: str = "cuda",
) -> np.ndarray:
    """Reads regions of the open file `fd` into device memory: region i's `nbytes[i]`
    bytes at `file_offsets[i]` land at device address `ptrs[i]` on CUDA device `device`.
    Returns the CRC32C of each region (zip's CRC-32 with `zip_crc`; zeros when not
    `checksum`), in the order given.
    `zero_ranges` are (file_offset, nbytes) ranges that must hold zeros (FormatError
    otherwise). `path` names the file in errors; `gds_path`, when given, lets
    TENSORFILE_GDS read with cuFile through a second, O_DIRECT descriptor of that path.
    The caller owns the destinations and must not use them until this returns; the
    device's pending work is synchronised first. Regions must not overlap. Releases the
    GIL. This is the entry point for every loader that fills CUDA memory from a file."""
    p = np.asarray(ptrs, dtype=np.uint64)
    n = np.asarray(nbytes, dtype=np.uint64)
    o = np.asarray(file_offsets, dtype=np.uint64)
    order = _sorted(o)
    if order is not None:
        p, n, o = p[order], n[order], o[order]
    z = sorted((int(a), int(b)) for a, b in zero_ranges if int(b) > 0)
    zo = np.array([a for a, _ in z], dtype=np.uint64)
    zn = np.array([b for _, b in z], dtype=np.uint64)
    threads = _config.num_threads(num_threads)
    if backend == "cuda":
        _synchronize(device)

    def call(gds_fd: int) -> np.ndarray:
        return _engine.device_read_regions(
            backend=backend,
            device=device,
            fd=fd,
            ptrs=p,
            nbytes=n,
            file_offsets=o,
            zero_offsets=zo,
            zero_nbytes=zn,
            num_threads=threads,
            staging_nbytes=_config.staging_nbytes(),
            staging_buffers=_config.staging_buffers(),
            checksum=checksum,
            path=path,
            gds_fd=gds_fd,
            zip_crc=zip_crc,
        )

    crcs = _transfer(False, fd, path, gds_path if backend == "cuda" else None, call)
    if order is not None:
        out = np.empty_like(crcs)
        out[order] = crcs
        crcs = out
    return crcs


def write_regions_from_device(
    fd: int,
    path: str,
    ptrs: Sequence[int] | np.ndarray,
    nbytes: Sequence[int] | np.ndarray,
    file_offsets: Sequence[int] | np.ndarray,
    device: int,
    *,
    num_threads: int | None = None,
    gds_path: str | None = None,
    backend: str = "cuda",
) -> np.ndarray:
    """Writes device memory regions to the open file `fd` (the reverse of
    read_regions_to_device) and returns each region's CRC32C, computed from the bytes
    written. Regions sorted by file offset, not overlapping; the file should be fresh
    (bytes between regions are zeros or holes). Releases the GIL."""
    p = np.asarray(ptrs, dtype=np.uint64)
    n = np.asarray(nbytes, dtype=np.uint64)
    o = np.asarray(file_offsets, dtype=np.uint64)
    threads = _config.num_threads(num_threads)
    if backend == "cuda":
        _synchronize(device)

    def call(gds_fd: int) -> np.ndarray:
        return _engine.device_write_regions(
            backend=backend,
            device=device,
            fd=fd,
            ptrs=p,
            nbytes=n,
            file_offsets=o,
            num_threads=threads,
            staging_nbytes=_config.staging_nbytes(),
            staging_buffers=_config.staging_buffers(),
            checksum=True,
            path=path,
            gds_fd=gds_fd,
        )

    return _transfer(True, fd, path, gds_path if backend == "cuda" else None, call)


def release_staging() -> None:
    """Frees the pinned staging buffers that CUDA transfers keep between calls."""
    torch = sys.modules.get("torch")
    if torch is None or not cuda_available():
        return
    for d in range(torch.cuda.device_count()):
        _engine.staging_trim("cuda", d)


def _synchronize(device: int) -> None:
    """Waits for torch's queued work on `device`: fresh destinations may reuse memory
    that queued kernels still use, and sources may still be being computed."""
    import torch

    torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- load / save hooks


def _require_cuda(torch: Any) -> None:
    if not _load_runtime():
        raise RuntimeError(
            f"torch reports CUDA, but tensorfile cannot open the CUDA runtime: {_engine.cuda_error()}"
        )


def mapped_location(saved: str, map_location: Any) -> str:
    """Where a storage saved on `saved` goes under a non-callable map_location, as in
    torch.load: None keeps it, a dict remaps saved device strings, anything else (a
    string or torch.device) sends every storage there."""
    if map_location is None:
        return saved
    if isinstance(map_location, dict):
        return str(map_location.get(saved, saved))
    return str(map_location)


def target_devices(
    torch: Any, saved: Sequence[str], kinds: Sequence[str], idx: Sequence[int], map_location: Any
) -> dict[int, Any]:
    """{storage index: torch.device} for the storages of `idx` that map_location sends
    to CUDA and that can be read there directly. Callables are left out: as in
    torch.load they receive the storage on the CPU and decide for themselves."""
    if callable(map_location) and not isinstance(map_location, (str, dict, torch.device)):
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


def zero_ranges(
    offsets: np.ndarray, nbytes: np.ndarray, begin: int, end: int
) -> list[tuple[int, int]]:
    """The file ranges in [begin, end) outside every storage: the format's padding."""
    out = []
    cursor = begin
    for off, nb in sorted(zip(offsets.tolist(), nbytes.tolist())):
        if off > cursor:
            out.append((cursor, off - cursor))
        cursor = max(cursor, off + nb)
    if end > cursor:
        out.append((cursor, end - cursor))
    return out


def read_storages(
    torch: Any,
    fd: int,
    path: str,
    targets: dict[int, Any],
    offsets: np.ndarray,
    nbytes: np.ndarray,
    verify: bool,
    threads: int,
    zeros: list[tuple[int, int]],
    zip_crc: bool = False,
) -> tuple[dict[int, Any], list[int], np.ndarray]:
    """Allocates each target storage on its CUDA device and fills it from the file.
    Returns ({storage index: UntypedStorage}, storage indexes, their CRC32Cs)."""
    _require_cuda(torch)
    out: dict[int, Any] = {}
    by_device: dict[int, list[int]] = {}
    for s, dev in targets.items():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        out[s] = torch.UntypedStorage(int(nbytes[s]), device=torch.device("cuda", index))
        if nbytes[s]:
            by_device.setdefault(index, []).append(s)
    order: list[int] = []
    crcs: list[np.ndarray] = []
    first = True
    for index, group in sorted(by_device.items()):
        got = read_regions_to_device(
            fd,
            path,
            [out[s].data_ptr() for s in group],
            nbytes[group],
            offsets[group],
            index,
            checksum=verify,
            zero_ranges=zeros if first else (),
            num_threads=threads,
            gds_path=path,
            zip_crc=zip_crc,
        )
        first = False
        order += group
        crcs.append(got)
    if first and zeros:  # nothing to read, but the padding is still checked
        dev = next(iter(targets.values()))
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        read_regions_to_device(fd, path, [], [], [], index, zero_ranges=zeros, num_threads=threads)
    return out, order, (np.concatenate(crcs) if crcs else np.zeros(0, dtype=np.uint32))


def write_storages(
    fd: int,
    path: str,
    gds_path: str,
    devices: Sequence[str],
    ptrs: np.ndarray,
    nbytes: np.ndarray,
    file_offsets: np.ndarray,
    threads: int,
    task: int,
    writeback: bool = False,
) -> np.ndarray:
    """Writes a save plan's storages, host ones with the engine's write_regions and CUDA
    ones through the staging pipeline, device by device; returns every CRC32C.
    `gds_path` opens the same file again for cuFile (e.g. /proc/self/fd/N). `writeback`
    (for a save that fsyncs) starts the disk write of host bytes as they are written."""
    crcs = np.zeros(len(nbytes), dtype=np.uint32)
    dev = np.array(devices, dtype=object)
    full = nbytes > 0
    host = full & (dev == "cpu")
    if host.any():
        crcs[host] = _engine.write_regions(
            fd, ptrs[host], nbytes[host], file_offsets[host], threads, task, True, path, writeback
        )
    for name in sorted(set(devices) - {"cpu"}):
        mask = full & (dev == name)
        if not mask.any():
            continue
        if not _load_runtime():
            raise RuntimeError(
                f"tensorfile.save: cannot open the CUDA runtime to save {name} tensors: {_engine.cuda_error()}"
            )
        index = _device_index(name)
        crcs[mask] = write_regions_from_device(
            fd,
            path,
            ptrs[mask],
            nbytes[mask],
            file_offsets[mask],
            index,
            num_threads=threads,
            gds_path=gds_path,
        )
    return crcs


def _device_index(name: str) -> int:
    """The CUDA device index of a device string; a plain "cuda" is torch's current device,
    as torch itself reads it (not 0: a process using only cuda:1 must not touch 0)."""
    if ":" in name:
        return int(name.split(":", 1)[1])
    import torch

    return int(torch.cuda.current_device())


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
