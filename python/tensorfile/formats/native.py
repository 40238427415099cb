"""The tensorfile format v1: preamble, JSON header and aligned storage regions.

`encode_header` and `make_preamble` write it; `parse_preamble` and `parse_header` are the
pure "parse, then trust" validator from header bytes to a `Layout` that the loader may
use without further checks. docs/format.md is the normative description.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from .. import _engine, _safejson
from .._dtypes import ITEMSIZE, TORCH_GRAD_DTYPES
from .._errors import ChecksumError, FormatError
from .._tree import validate as validate_tree
from . import FLAG_REQUIRES_GRAD, Layout, LazyRows, TensorRow

MAGIC = b"TNSRFILE"
MAJOR = 1
MINOR = 1  # the newest minor version this module reads and writes (docs/format.md §11)
PREAMBLE = struct.Struct(
    "<8sHHIQQ"
)  # magic, major, minor, header crc32c, header nbytes, file nbytes
PREAMBLE_NBYTES = PREAMBLE.size  # 32
ALIGN = 4096
MAX_HEADER_NBYTES = 64 << 20
MAX_NDIM = 64
MAX_INT = 2**63 - 1
_MAX_JSON_DEPTH = 1000  # far past the deepest tree a save makes (_tree.MAX_DEPTH containers)

_HEADER_KEYS = ("tree", "tensors", "storages", "metadata", "crc32c")
_LOWER_HEX = re.compile(r"[0-9a-f]*")
# A storage reference names a file of the same directory: no separator, no leading dot.
REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_STORAGE_DEVICE = re.compile(r"cpu|cuda(?::(?:0|[1-9][0-9]{0,4}))?")


def valid_storage_device(s: str) -> bool:
    """Storages live on the CPU or a CUDA device."""
    return _STORAGE_DEVICE.fullmatch(s) is not None


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def storage_offsets(nbytes: list[int]) -> list[int]:
    """The canonical offset of each storage, relative to the start of the data section."""
    out = []
    cursor = 0
    for n in nbytes:
        out.append(cursor)
        cursor = align_up(cursor + n)
    return out


def data_start(header_nbytes: int) -> int:
    return align_up(PREAMBLE_NBYTES + header_nbytes)


def file_nbytes(
    header_nbytes: int, offsets: list[int] | np.ndarray, nbytes: list[int] | np.ndarray
) -> int:
    if isinstance(offsets, np.ndarray) and isinstance(nbytes, np.ndarray):
        full = nbytes > 0
        end = int((offsets[full] + nbytes[full]).max()) if full.any() else 0
    else:
        end = max((o + n for o, n in zip(offsets, nbytes) if n), default=0)
    return data_start(header_nbytes) + end if end else PREAMBLE_NBYTES + header_nbytes


@dataclass
class TensorTable:
    """The header's tensor rows as columns, as the planner builds them: row i is
    [KINDS[kind[i]], storage[i], dtype_names[dtype[i]], shapes[dim_begin[i]:][:ndim[i]],
    strides[...same...], offset[i], flags[i]]."""

    kind: np.ndarray  # int8: 0 torch, 1 numpy
    storage: np.ndarray  # int64
    dtype: np.ndarray  # int32, index into dtype_names
    dtype_names: list[str]
    dim_begin: np.ndarray  # int64
    ndim: np.ndarray  # int64
    shapes: np.ndarray  # int64
    strides: np.ndarray  # int64
    offset: np.ndarray  # int64, bytes into the storage
    flags: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.kind)

    @staticmethod
    def from_rows(rows: Sequence[Sequence[Any]]) -> TensorTable:
        """The columns of header rows [kind, storage, dtype, shape, strides, offset, flags]."""
        n = len(rows)
        names: dict[str, int] = {}
        dims = [len(r[3]) for r in rows]
        return TensorTable(
            kind=np.array([KINDS.index(r[0]) for r in rows], dtype=np.int8),
            storage=np.array([r[1] for r in rows], dtype=np.int64),
            dtype=np.array([names.setdefault(r[2], len(names)) for r in rows], dtype=np.int32),
            dtype_names=list(names),
            dim_begin=np.cumsum([0, *dims[:-1]], dtype=np.int64)[:n],
            ndim=np.array(dims, dtype=np.int64),
            shapes=np.fromiter(chain.from_iterable(r[3] for r in rows), np.int64, sum(dims)),
            strides=np.fromiter(chain.from_iterable(r[4] for r in rows), np.int64, sum(dims)),
            offset=np.array([r[5] for r in rows], dtype=np.int64),
            flags=np.array([r[6] for r in rows], dtype=np.int64),
        )

    def rows(self) -> list[list[Any]]:
        shapes, strides = self.shapes.tolist(), self.strides.tolist()
        return [
            [KINDS[k], s, self.dtype_names[d], shapes[b : b + n], strides[b : b + n], o, f]
            for k, s, d, b, n, o, f in zip(
                self.kind.tolist(),
                self.storage.tolist(),
                self.dtype.tolist(),
                self.dim_begin.tolist(),
                self.ndim.tolist(),
                self.offset.tolist(),
                self.flags.tolist(),
            )
        ]


KINDS = ("torch", "numpy")


def encode_header(
    tree: Any,
    tensors: TensorTable,
    storage_offsets: np.ndarray,
    storage_nbytes: np.ndarray,
    storage_devices: list[str],
    metadata: dict[str, str],
    refs: dict[int, tuple[str, int]] | None = None,
) -> tuple[bytearray, int]:
    """The header with every checksum zero; returns it and where the checksum hex begins,
    so `set_checksums` can fill them in once the data has been written. The checksum
    field is fixed-width, so the header's length never depends on the checksums. The
    bytes are those of json.dumps with compact separators over the header object; the
    engine writes the two tables. `refs` (format 1.1) maps storages to the (file, storage
    index) holding their bytes; their offsets take no room (`canonical_offsets`)."""
    devices = sorted(set(storage_devices))
    if any(not valid_storage_device(d) for d in devices):
        raise ValueError(f"storage devices must be cpu or cuda[:index], got {devices}")
    if len(devices) == 1:
        device = np.zeros(len(storage_devices), dtype=np.int32)
    else:
        code = {d: i for i, d in enumerate(devices)}
        device = np.fromiter(map(code.__getitem__, storage_devices), np.int32, len(storage_devices))
    t = tensors
    tensor_rows, storage_rows = _engine.encode_tables(
        t.kind, t.storage, t.dtype, t.dim_begin, t.ndim, t.offset, t.flags, t.shapes, t.strides,
        t.dtype_names, storage_offsets, storage_nbytes, device, devices,
    )  # fmt: skip
    if refs:
        rows = json.loads(storage_rows)
        for s, (file, index) in refs.items():
            rows[s].append(["ref", file, index])
        storage_rows = json.dumps(rows, separators=(",", ":")).encode("ascii")
    head = b"".join(
        (
            b'{"tree":',
            _engine.encode_tree(tree, _MAX_JSON_DEPTH),
            b',"tensors":',
            tensor_rows,
            b',"storages":',
            storage_rows,
            b',"metadata":',
            _engine.encode_tree(metadata, _MAX_JSON_DEPTH),
            b',"crc32c":"',
        )
    )
    header = bytearray(head)
    header += b"0" * (8 * len(storage_devices)) + b'"}'
    return header, len(head)


def set_checksums(header: bytearray, crc_pos: int, crcs: np.ndarray) -> None:
    hexed = crcs.astype(">u4").tobytes().hex().encode("ascii")
    header[crc_pos : crc_pos + len(hexed)] = hexed


def header_crc(preamble_wo_crc: bytes, header: bytes | bytearray | memoryview) -> int:
    crc = _engine.crc32c(preamble_wo_crc[:12])
    crc = _engine.crc32c(preamble_wo_crc[16:32], crc)
    return int(_engine.crc32c(header, crc))


def make_preamble(header: bytes | bytearray, total_nbytes: int, minor: int = 0) -> bytes:
    """The preamble of `header`; `minor` is 1 for a file with storage references (the
    oldest version that reads it), 0 otherwise."""
    draft = PREAMBLE.pack(MAGIC, MAJOR, minor, 0, len(header), total_nbytes)
    return PREAMBLE.pack(MAGIC, MAJOR, minor, header_crc(draft, header), len(header), total_nbytes)


@dataclass
class Preamble:
    major: int
    minor: int
    header_crc: int
    header_nbytes: int
    file_nbytes: int


def looks_like(head: bytes) -> bool:
    return head.startswith(MAGIC)


def parse_preamble(raw: bytes, actual_nbytes: int | None, name: str) -> Preamble:
    if len(raw) < PREAMBLE_NBYTES:
        if len(raw) == 0:
            raise FormatError(f"{name}: the file is empty (not a tensorfile)")
        raise FormatError(
            f"{name}: the file is {len(raw)} bytes, shorter than the {PREAMBLE_NBYTES}-byte preamble"
        )
    magic, major, minor, hcrc, hlen, flen = PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        from . import sniff

        kind = sniff(raw)
        hint = f" (it looks like a {kind} file)" if kind != "unknown" else ""
        raise FormatError(
            f"{name}: not a tensorfile: bad magic {magic!r}{hint}; tensorfile reads its own files, "
            "torch.save zip and safetensors files"
        )
    if major != MAJOR:
        raise FormatError(
            f"{name}: tensorfile format version {major}.{minor} is not supported by this reader "
            f"(it reads version {MAJOR}.x); upgrade tensorfile"
        )
    if hlen > MAX_HEADER_NBYTES:
        raise FormatError(
            f"{name}: header of {hlen} bytes exceeds the {MAX_HEADER_NBYTES}-byte limit"
        )
    if flen < PREAMBLE_NBYTES + hlen:
        raise FormatError(f"{name}: recorded file size {flen} is smaller than its header")
    if actual_nbytes is not None and flen != actual_nbytes:
        what = "truncated" if actual_nbytes < flen else "followed by trailing bytes"
        raise FormatError(
            f"{name}: the file is {actual_nbytes} bytes but records {flen}: it is {what}"
        )
    return Preamble(major, minor, hcrc, hlen, flen)


def _bad(name: str, message: str) -> FormatError:
    return FormatError(f"{name}: invalid header: {message}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise FormatError(f"duplicate key {k!r:.60} in a JSON object")
            seen.add(k)
    return out


def _is_index(x: Any) -> bool:
    return type(x) is int and 0 <= x <= MAX_INT


def parse_header(
    raw: bytes | bytearray | memoryview, pre: Preamble, preamble_raw: bytes, name: str, verify: bool
) -> Layout:
    """Validates header bytes completely before anything is allocated (docs/format.md,
    "Validation"); raises FormatError (ChecksumError for a checksum) naming `name`."""
    if verify and header_crc(preamble_raw, raw) != pre.header_crc:
        raise ChecksumError(
            f"{name}: header checksum mismatch (the file was damaged after it was written); "
            "re-save it, or pass verify=False to skip checksums"
        )
    layout = decode_fast(raw, pre)
    if layout is not None:
        return layout
    try:
        return parse_header_reference(raw, pre, name)
    except FormatError as e:
        if pre.minor <= MINOR:
            raise
        raise FormatError(
            f"{e} (the file is format {pre.major}.{pre.minor}, newer than the {MAJOR}.{MINOR} "
            "this reader knows: upgrade tensorfile)"
        ) from None


def read_layout(
    read: Any, file_nbytes: int | None, head: bytes, name: str, verify: bool
) -> tuple[Layout, bytes]:
    """Parses a tensorfile whose first PREAMBLE_NBYTES bytes are `head`; `read(nbytes,
    offset)` reads more. Returns the layout and the bytes between the header and the
    first storage, which must be zero padding (the caller checks them with the padding
    rule every path shares)."""
    pre = parse_preamble(head, file_nbytes, name)
    upto = min(data_start(pre.header_nbytes), pre.file_nbytes)
    blob = read(upto - PREAMBLE_NBYTES, PREAMBLE_NBYTES)
    if len(blob) != upto - PREAMBLE_NBYTES:
        raise FormatError(f"{name}: the file ends inside its header (truncated)")
    layout = parse_header(memoryview(blob)[: pre.header_nbytes], pre, head, name, verify)
    layout.version = f"{pre.major}.{pre.minor}"
    layout.header_nbytes = pre.header_nbytes
    return layout, blob[pre.header_nbytes :]


# The engine's decoder takes the dtype table from here, so the names and widths have
# one source: (kind 0 torch / 1 numpy, name, itemsize, may carry requires_grad).
_DTYPE_TABLE = [
    (KINDS.index(kind), dtype, itemsize, dtype in TORCH_GRAD_DTYPES)
    for kind, table in ITEMSIZE.items()
    for dtype, itemsize in table.items()
]
_DTYPE_NAMES = [row[1] for row in _DTYPE_TABLE]


def decode_fast(raw: bytes | bytearray | memoryview, pre: Preamble) -> Layout | None:
    """The engine's decoder (csrc/header.cpp): the same rules as
    `parse_header_reference`, applied in native code to headers as tensorfile writes
    them. Returns None where it declines (unusual but possibly valid headers, and every
    invalid one), leaving the decision and the error message to the reference."""
    got = _engine.decode_header(raw, pre.file_nbytes, _DTYPE_TABLE)
    if got is None:
        return None
    tb, te, mb, me, offs, sizes, crcs, sdev, devices, skind, table, shapes, strides = got
    view = memoryview(raw)
    tree = json.loads(bytes(view[tb:te]))
    metadata = json.loads(bytes(view[mb:me]))
    ntensors, nstorages = len(table), len(sizes)

    def rows() -> Iterator[TensorRow]:
        kind_i, store, dtype_i, ndim, off, flags = table.T.tolist()
        dims = set(ndim)
        if len(dims) == 1:  # every row has the same rank: split without a Python loop
            k = dims.pop()
            shape_rows = shapes.reshape(ntensors, k).tolist()
            stride_rows = strides.reshape(ntensors, k).tolist()
        else:
            flat_shapes, flat_strides = shapes.tolist(), strides.tolist()
            shape_rows, stride_rows = [], []
            at = 0
            for n in ndim:
                shape_rows.append(flat_shapes[at : at + n])
                stride_rows.append(flat_strides[at : at + n])
                at += n
        return iter(
            map(
                TensorRow._make,
                zip(
                    map(KINDS.__getitem__, kind_i),
                    store,
                    map(_DTYPE_NAMES.__getitem__, dtype_i),
                    shape_rows,
                    stride_rows,
                    off,
                    flags,
                ),
            )
        )

    def members() -> Iterator[list[int]]:
        out: list[list[int]] = [[] for _ in range(nstorages)]
        for i, s in enumerate(table[:, 1].tolist()):
            out[s].append(i)
        return iter(out)

    base = data_start(pre.header_nbytes)
    return Layout(
        tree=tree,
        tensors=LazyRows(ntensors, rows),
        storage_kind=list(map(KINDS.__getitem__, skind.tolist())),
        storage_device=list(map(devices.__getitem__, sdev.tolist())),
        storage_nbytes=sizes,
        storage_offsets=offs + np.uint64(base),
        storage_crcs=crcs,
        storage_tensors=LazyRows(nstorages, members),
        metadata=metadata,
        header_end=PREAMBLE_NBYTES + pre.header_nbytes,
        file_nbytes=pre.file_nbytes,
        minor=pre.minor,
    )


def parse_header_reference(raw: bytes | bytearray | memoryview, pre: Preamble, name: str) -> Layout:
    """The complete validator in Python, checksum aside: the normative reading of
    docs/format.md, which words every error; `decode_fast` must agree with it."""
    _safejson.check_depth(raw, name=f"{name}: invalid header", max_depth=_MAX_JSON_DEPTH)
    try:
        text = bytes(raw).decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FormatError as e:
        raise _bad(name, str(e)) from None
    except RecursionError:
        raise _bad(name, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(name, f"not valid UTF-8 JSON ({str(e)[:120]})") from None
    if type(doc) is not dict or tuple(doc) != _HEADER_KEYS:
        got = list(doc)[:8] if type(doc) is dict else type(doc).__name__
        raise _bad(
            name,
            f"the header must be an object with keys {list(_HEADER_KEYS)} in that order, got {got}",
        )
    tensors, storages, metadata, crc_hex = (
        doc["tensors"],
        doc["storages"],
        doc["metadata"],
        doc["crc32c"],
    )
    if type(metadata) is not dict or any(type(v) is not str for v in metadata.values()):
        raise _bad(name, "metadata must map strings to strings")
    if type(storages) is not list or type(tensors) is not list:
        raise _bad(name, "tensors and storages must be arrays")
    nstorage = len(storages)
    if type(crc_hex) is not str or len(crc_hex) != 8 * nstorage:
        raise _bad(name, f"crc32c must be {8 * nstorage} hex digits, one group of 8 per storage")
    if not _LOWER_HEX.fullmatch(crc_hex):
        raise _bad(name, "crc32c must be lowercase hexadecimal digits")
    crcs = np.frombuffer(bytes.fromhex(crc_hex), dtype=">u4").astype(np.uint32)

    # Storages: [offset, nbytes, device], laid out canonically.
    offsets: list[int] = []
    sizes: list[int] = []
    devices: list[str] = []
    cursor = 0
    refs: dict[int, tuple[str, int]] = {}
    for i, row in enumerate(storages):
        if type(row) is not list or len(row) not in (3, 4):
            raise _bad(name, f"storage {i} must be [offset, nbytes, device]")
        if len(row) == 4 and pre.minor < 1:
            raise _bad(
                name,
                f"storage {i} has a fourth item (a storage reference), which needs format "
                f"1.1; the file says {pre.major}.{pre.minor}",
            )
        off, nb, dev = row[:3]
        if not _is_index(off) or not _is_index(nb):
            raise _bad(name, f"storage {i}: offset and nbytes must be integers in [0, 2^63)")
        if len(row) == 4:
            refs[i] = _parse_ref(name, i, row[3], nb)
        if off != cursor:
            why = "overlaps the previous one" if off < cursor else "is not where the layout puts it"
            raise _bad(
                name,
                f"storage {i} at data offset {off} {why} (expected {cursor}; offsets are 4096-aligned and in order)",
            )
        if type(dev) is not str or not valid_storage_device(dev):
            raise _bad(name, f"storage {i}: bad device {dev!r:.40}")
        offsets.append(off)
        sizes.append(nb)
        devices.append(dev)
        cursor = align_up(off + (0 if i in refs else nb))
        if cursor > MAX_INT:
            raise _bad(name, f"storage {i} ends beyond 2^63 bytes")
    here = [0 if i in refs else nb for i, nb in enumerate(sizes)]
    expected_end = file_nbytes(pre.header_nbytes, offsets, here)
    if expected_end != pre.file_nbytes:
        raise _bad(
            name,
            f"the storages end at byte {expected_end} but the preamble records {pre.file_nbytes}",
        )

    # Tensors: [kind, storage, dtype, shape, strides, offset, flags].
    ntensors = len(tensors)
    kinds: list[str] = []
    storage_kind: list[str | None] = [None] * nstorage
    storage_tensors: list[list[int]] = [[] for _ in range(nstorage)]
    storage_need = [0] * nstorage
    for i, row in enumerate(tensors):
        if type(row) is not list or len(row) != 7:
            raise _bad(
                name, f"tensor {i} must be [kind, storage, dtype, shape, strides, offset, flags]"
            )
        kind, s, dtype, shape, strides, off, flags = row
        sizes_of = ITEMSIZE.get(kind) if type(kind) is str else None
        if sizes_of is None:
            raise _bad(name, f"tensor {i}: unknown kind {kind!r:.40}")
        if type(s) is not int or not 0 <= s < nstorage:
            raise _bad(name, f"tensor {i}: storage index {s!r:.40} out of range")
        itemsize = sizes_of.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise _bad(name, f"tensor {i}: unknown {kind} dtype {dtype!r:.40}")
        if (
            type(shape) is not list
            or type(strides) is not list
            or len(shape) != len(strides)
            or len(shape) > MAX_NDIM
        ):
            raise _bad(
                name,
                f"tensor {i}: shape and strides must be arrays of equal length at most {MAX_NDIM}",
            )
        if (
            not _is_index(off)
            or type(flags) is not int
            or not 0 <= flags <= 3
            or (kind == "numpy" and flags)
        ):
            raise _bad(name, f"tensor {i}: bad offset or flags")
        if flags & FLAG_REQUIRES_GRAD and dtype not in TORCH_GRAD_DTYPES:
            raise _bad(
                name,
                f"tensor {i}: requires_grad is set on dtype {dtype}, which cannot have gradients",
            )
        numel = 1
        lo = hi = 0
        for d, st in zip(shape, strides):
            if not _is_index(d):
                raise _bad(
                    name, f"tensor {i}: shape entries must be non-negative integers, got {d!r:.40}"
                )
            if type(st) is not int or abs(st) > MAX_INT or (kind == "torch" and st < 0):
                raise _bad(name, f"tensor {i}: bad stride {st!r:.40}")
            numel *= d
            if d:
                reach = (d - 1) * st
                if reach < 0:
                    lo += reach
                else:
                    hi += reach
        if numel > MAX_INT:
            raise _bad(name, f"tensor {i}: shape {shape} has more than 2^63 elements")
        if kind == "torch":
            if off % itemsize:
                raise _bad(
                    name,
                    f"tensor {i}: byte offset {off} is not a multiple of the element size {itemsize}",
                )
            lo, hi = lo * itemsize, hi * itemsize
        end = off + hi + itemsize if numel else off
        if numel and off + lo < 0:
            raise _bad(name, f"tensor {i}: its strides reach before the start of storage {s}")
        if end > sizes[s]:
            raise _bad(name, f"tensor {i} needs {end} bytes of storage {s}, which holds {sizes[s]}")
        if storage_kind[s] is None:
            storage_kind[s] = kind
        elif storage_kind[s] != kind:
            raise _bad(name, f"storage {s} is shared by torch and numpy tensors")
        if numel and end > storage_need[s]:
            storage_need[s] = end
        storage_tensors[s].append(i)
        kinds.append(kind)
    for s in range(nstorage):
        if storage_kind[s] is None:
            raise _bad(name, f"storage {s} is not used by any tensor")
        if storage_need[s] != sizes[s]:
            raise _bad(
                name, f"storage {s} holds {sizes[s]} bytes but its tensors use {storage_need[s]}"
            )

    try:
        order = validate_tree(doc["tree"], ntensors, kinds)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    if len(set(order)) != ntensors:
        raise _bad(name, "every tensor row must be referenced by the object tree")

    base = data_start(pre.header_nbytes)
    return Layout(
        tree=doc["tree"],
        tensors=[TensorRow._make(row) for row in tensors],
        storage_kind=storage_kind,  # type: ignore[arg-type]
        storage_device=devices,
        storage_nbytes=np.array(sizes, dtype=np.uint64),
        storage_offsets=np.array(offsets, dtype=np.uint64) + np.uint64(base),
        storage_crcs=crcs,
        storage_tensors=storage_tensors,
        metadata=metadata,
        header_end=PREAMBLE_NBYTES + pre.header_nbytes,
        file_nbytes=pre.file_nbytes,
        minor=pre.minor,
        storage_refs=refs,
    )


def _parse_ref(name: str, i: int, item: Any, nbytes: int) -> tuple[str, int]:
    """A storage reference, ["ref", file, index]: the storage's bytes are storage `index`
    of `file`, a tensorfile in the same directory (docs/format.md §4.6)."""
    if (
        type(item) is not list
        or len(item) != 3
        or item[0] != "ref"
        or type(item[1]) is not str
        or not _is_index(item[2])
    ):
        raise _bad(name, f'storage {i}: a reference must be ["ref", file name, storage index]')
    if not REF_NAME.fullmatch(item[1]):
        raise _bad(
            name,
            f"storage {i} refers to {item[1]!r:.80}, not a file name of the same directory",
        )
    if nbytes == 0:
        raise _bad(name, f"storage {i}: an empty storage cannot be a reference")
    return item[1], item[2]


def canonical_offsets(nbytes: np.ndarray, refs: Iterable[int] = ()) -> np.ndarray:
    """Data-section offsets of storages of `nbytes` bytes (§5.1); storages in `refs`
    take no room."""
    here = nbytes.copy()
    here[list(refs)] = 0
    mask = np.uint64(ALIGN - 1)
    aligned = (here + mask) & ~mask
    offsets = np.zeros(len(aligned), dtype=np.uint64)
    np.cumsum(aligned[:-1], out=offsets[1:])
    return offsets


def _reject_constant(token: str) -> Any:
    raise FormatError(f"JSON constant {token} is not allowed")
