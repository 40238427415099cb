"""Type stub for the native engine (csrc/bindings.cpp)."""

from typing import Any

import numpy as np
import numpy.typing as npt

def write_regions(
    fd: int,
    ptrs: npt.ArrayLike,
    nbytes: npt.ArrayLike,
    file_offsets: npt.ArrayLike,
    num_threads: int,
    task_nbytes: int,
    checksum: bool,
    path: str,
) -> npt.NDArray[np.uint32]: ...
def read_regions(
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
) -> npt.NDArray[np.uint32]: ...
def checksum_regions(
    ptrs: npt.ArrayLike, nbytes: npt.ArrayLike, num_threads: int, task_nbytes: int
) -> npt.NDArray[np.uint32]: ...
def crc32c(data: Any, crc: int = 0, software: bool = False) -> int: ...
def crc32c_combine(crc_a: int, crc_b: int, nbytes_b: int) -> int: ...
def crc32c_hardware() -> bool: ...
def preallocate(fd: int, nbytes: int, path: str) -> None: ...
def advise_hugepages(ptr: int, nbytes: int) -> None: ...
def _inject_write_fault(countdown: int, error_number: int) -> None: ...
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
