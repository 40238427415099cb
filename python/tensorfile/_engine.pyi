"""Type stub for the native engine (csrc/python/bindings.cpp)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

def write_regions(
    *,
    fd: int,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    file_offsets: npt.ArrayLike,
    num_threads: int,
    task_nbytes: int,
    checksum: bool,
    path: str,
    writeback: bool = False,
) -> npt.NDArray[np.uint32]: ...
def read_regions(
    *,
    fd: int,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    file_offsets: npt.ArrayLike,
    num_threads: int,
    task_nbytes: int,
    checksum: bool,
    check_gaps: bool,
    gap_begin: int,
    gap_end: int,
    path: str,
    hugepages: bool = False,
    zip_crc: bool = False,
) -> npt.NDArray[np.uint32]: ...
def checksum_regions(
    *,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    num_threads: int,
    task_nbytes: int,
    zip_crc: bool = False,
) -> npt.NDArray[np.uint32]: ...
def crc32c(data: Any, crc: int = 0, software: bool = False) -> int: ...
def crc32c_combine(crc_a: int, crc_b: int, nbytes_b: int) -> int: ...
def crc32c_hardware() -> bool: ...
def crc32_zip(data: Any, crc: int = 0, software: bool = False) -> int: ...
def crc32_zip_combine(crc_a: int, crc_b: int, nbytes_b: int) -> int: ...
def crc32_zip_hardware() -> bool: ...
def hash_and_checksum_regions(
    *,
    addresses: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    num_threads: int,
) -> tuple[list[bytes], npt.NDArray[np.uint32]]: ...
def hash_regions(
    *,
    addresses: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    num_threads: int,
) -> list[bytes]: ...
def xxh3_128(data: Any) -> bytes: ...
def _xxh3_128_with(data: Any, kernel: str) -> bytes: ...
def _xxh3_128_parts(parts: Sequence[Any], kernel: str = "auto") -> list[bytes]: ...
def _xxh3_kernels() -> list[str]: ...
def preallocate(fd: int, nbytes: int, path: str) -> None: ...
def _inject_write_fault(countdown: int, error_number: int) -> None: ...
def cuda_load(path: str = "") -> bool: ...
def cuda_available() -> bool: ...
def cuda_error() -> str: ...
def cuda_library() -> str: ...
def cufile_load(path: str = "") -> bool: ...
def cufile_error() -> str: ...
def device_read_regions(
    *,
    backend: str,
    device: int,
    fd: int,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    file_offsets: npt.ArrayLike,
    zero_offsets: npt.ArrayLike,
    zero_nbytes: npt.ArrayLike,
    num_threads: int,
    staging_nbytes: int,
    staging_buffers: int,
    checksum: bool,
    path: str,
    gds_fd: int = -1,
    zip_crc: bool = False,
) -> npt.NDArray[np.uint32]: ...
def device_write_regions(
    *,
    backend: str,
    device: int,
    fd: int,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    file_offsets: npt.ArrayLike,
    num_threads: int,
    staging_nbytes: int,
    staging_buffers: int,
    checksum: bool,
    path: str,
    gds_fd: int = -1,
) -> npt.NDArray[np.uint32]: ...
def staging_trim(backend: str, device: int = 0) -> int: ...
def _sim_alloc(nbytes: int) -> int: ...
def _sim_free(ptr: int) -> None: ...
def _sim_read(ptr: int, nbytes: int) -> bytes: ...
def _sim_write(ptr: int, data: bytes) -> None: ...
def _sim_configure(copy_fault_countdown: int, delay_us: int) -> None: ...
def _sim_reset_peak() -> None: ...
def _sim_counters() -> dict[str, int]: ...
def decode_header(
    header: Any, file_nbytes: int, dtypes: list[tuple[int, str, int, bool]]
) -> tuple[Any, ...] | None: ...
def encode_tables(
    kind: npt.ArrayLike,
    storage: npt.ArrayLike,
    dtype: npt.ArrayLike,
    dim_begin: npt.ArrayLike,
    ndim: npt.ArrayLike,
    offset: npt.ArrayLike,
    flags: npt.ArrayLike,
    shapes: npt.ArrayLike,
    strides: npt.ArrayLike,
    dtype_names: list[str],
    storage_offsets: npt.ArrayLike,
    storage_nbytes: npt.ArrayLike,
    device: npt.ArrayLike,
    devices: list[str],
) -> tuple[bytes, bytes]: ...
def encode_tree(tree: Any, max_depth: int) -> bytes: ...
def tensor_dict_items(
    keys: list[Any], values: list[Any], tensor_type: type, param_type: type, first: int
) -> list[Any] | None: ...
def plan_tensors(
    sizes: list[Any],
    strides: list[Any],
    data_ptrs: list[int],
    storage_offsets: list[int],
    requires_grad: list[bool],
    dtypes: list[Any],
    dtype_codes: dict[Any, int],
    itemsizes: list[int],
    types: list[type],
    flagged_type: type,
    type_flag: int,
    grad_flag: int,
    storage_ptr: Any,
    align: int,
) -> tuple[npt.NDArray[Any], ...] | None: ...
