"""The file formats tensorfile reads: what each parses its bytes into (`Layout`, one
`TensorRow` per tensor, one storage table), and the one table that tells them apart by
their first bytes (never by the file name)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .._tree import no_gc

# Tensor row flags, as docs/format.md numbers them.
FLAG_REQUIRES_GRAD = 1
FLAG_PARAMETER = 2


class TensorRow(NamedTuple):
    """One tensor of a file: what it views and how."""

    kind: str  # "torch" or "numpy"
    storage: int  # index into the storage table
    dtype: str  # the format's dtype name ("float32", "bfloat16", ...)
    shape: list[int]
    strides: list[int]  # in elements for torch rows, in bytes for numpy rows
    offset: int  # bytes into the storage
    flags: int  # FLAG_REQUIRES_GRAD | FLAG_PARAMETER


class LazyRows(Sequence[Any]):
    """A list built on first indexing, with the collector paused. The engine's decoder
    returns columns; opening a file to list its keys never needs a Python row per
    tensor, and with 20,000 tensors building them was most of the cost of open(). The
    first read of a tensor builds them all, once. Iterating before any indexing makes
    each item afresh and keeps none, so one pass over all rows (as a load makes) never
    holds them all at once."""

    def __init__(self, n: int, make: Callable[[], Iterator[Any]]) -> None:
        self._n = n
        self._make: Callable[[], Iterator[Any]] | None = make
        self._items: list[Any] = []

    def _all(self) -> list[Any]:
        make = self._make
        if make is not None:
            with no_gc():
                self._items = list(make())
            self._make = None
        return self._items

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]

    def __iter__(self) -> Iterator[Any]:
        make = self._make
        return iter(self._items) if make is None else make()


@dataclass
class Layout:
    """A fully validated file: everything a reader needs, safe to trust. Offsets are
    absolute file offsets; `storage_crcs` hold what `crc_kind` names."""

    tree: Any  # the object tree (tensorfile), or None where `archive` rebuilds the graph
    tensors: Sequence[TensorRow]
    storage_kind: list[str]  # "torch" or "numpy" per storage
    storage_device: list[str]  # the device each storage was saved from
    storage_nbytes: np.ndarray  # uint64
    storage_offsets: np.ndarray  # uint64, absolute file offsets
    storage_crcs: np.ndarray  # uint32
    storage_tensors: Sequence[list[int]]  # tensor rows of each storage
    metadata: dict[str, str]
    header_end: int  # first byte after the header
    file_nbytes: int
    minor: int
    format: str = "tensorfile"  # "tensorfile", "torch.save" or "safetensors"
    crc_kind: str = "crc32c"  # "crc32c", "crc32" (zip; 0 means not computed) or "none"
    canonical_gaps: bool = True  # the bytes between storages must be zero padding
    version: str = ""
    header_nbytes: int = 0
    archive: Any = None  # torch.save: the unpickled records and object root
    # format 1.1: storage -> (file name in the same directory, storage index there) for the
    # storages whose bytes another file holds (incremental checkpoints)
    storage_refs: dict[int, tuple[str, int]] = field(default_factory=dict)


def layout_difference(a: Layout, b: Layout) -> str | None:
    """The first field in which two layouts differ, or None: arrays by dtype and values,
    lazily built lists by their items, everything else by type and value. The engine's
    decoder and the reference validator must agree exactly (tests and the fuzzer)."""
    for name in Layout.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            same = type(x) is type(y) and x.dtype == y.dtype and np.array_equal(x, y)
        else:
            x = list(x) if isinstance(x, LazyRows) else x
            y = list(y) if isinstance(y, LazyRows) else y
            same = type(x) is type(y) and x == y
        if not same:
            return name
    return None


# Protocol 2-5 pickles: legacy (pre-1.6) torch.save files and plain pickles.
_PICKLE_PREFIXES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def sniffers() -> tuple[tuple[str, Callable[[bytes], bool]], ...]:
    """(name, test of the first PREAMBLE_NBYTES bytes), in the order they are tried."""
    from . import native, safetensors, torchzip  # they import this module's types

    return (
        ("tensorfile", native.looks_like),
        ("torch.save", torchzip.looks_like),
        ("safetensors", safetensors.looks_like),
    )


def sniff(head: bytes) -> str:
    """The format whose first bytes `head` holds: "tensorfile", "torch.save",
    "safetensors", "pickle" or "unknown"."""
    for name, looks_like in sniffers():
        if looks_like(head):
            return name
    if head[:2] in _PICKLE_PREFIXES:
        return "pickle"
    return "unknown"
