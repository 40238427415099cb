"""torch.save files (the zip format of PyTorch 1.6 and later), read without executing them.

The zip's central directory is parsed here (zip64 included) and checked: one archive
folder, no duplicate, encrypted, compressed or overlapping records. `data.pkl` is read by
a restricted unpickler that resolves only the globals torch.load(weights_only=True)
allows for plain tensors and containers, each to a stand-in of our own: tensors become
`TensorRecord`s naming a storage record, and nothing from the file is ever imported or
called. A pickle naming any other global is refused with a FormatError naming it.
Storages are then read by the engine like any other file's, and each record's zip CRC-32
is checked (torch.load ignores it).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._dtypes import TORCH_GRAD_DTYPES, TORCH_ITEMSIZE
from .._errors import FormatError
from . import FLAG_PARAMETER, FLAG_REQUIRES_GRAD, Layout, TensorRow
from .picklebounds import MAX_DEPTH
from .torchglobals import StorageRef, TensorRecord
from .torchpickle import unpickle

MAX_PICKLE_NBYTES = 1 << 30

_EOCD = struct.Struct("<IHHHHIIH")  # signature .. comment length (22 bytes)
_EOCD64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_CENTRAL_LENGTHS = struct.Struct("<HHH")  # name, extra and comment lengths, at byte 28
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes

# Legacy typed storage classes named in torch.save pickles -> element dtype.


def looks_like(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


@dataclass(slots=True)
class ZipRecord:
    name: str
    data_offset: int
    nbytes: int
    crc32: int


@dataclass
class TorchArchive:
    """A validated torch.save zip: the object graph with TensorRecord leaves."""

    root: Any
    records: list[TensorRecord]  # in pickle order; record.index is the position
    storages: list[StorageRef]  # in first-use order; StorageRef.index is the position
    storage_records: list[ZipRecord]
    prefix: str
    version: str
    file_nbytes: int
    pickle_nbytes: int


# --------------------------------------------------------------------------- zip


def _zip64_extra(extra: bytes, want: list[str], name: str) -> dict[str, int]:
    """The zip64 extended-information field: 8-byte values, present only for the central
    directory fields that hold 0xFFFFFFFF (in the order uncompressed, compressed, offset)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        if len(body) != n:
            break
        if tag == 1:
            out = {}
            for i, field in enumerate(want):
                if 8 * i + 8 > n:
                    raise FormatError(f"{name}: zip64 field of a record is too short")
                out[field] = struct.unpack_from("<Q", body, 8 * i)[0]
            return out
        pos += 4 + n
    if want:
        raise FormatError(f"{name}: a zip record needs a zip64 field but has none")
    return {}


def _read_each(read: Any, offsets: list[int], sizes: list[int]) -> bytes:
    return b"".join(read(n, o) for o, n in zip(offsets, sizes))


def _entry_starts(cd: bytes, count: int) -> np.ndarray | None:
    """Where each of `count` central directory entries starts (each is 46 bytes and the
    name, extra field and comment whose lengths it gives), or None if they do not tile
    the directory exactly."""
    starts = []
    pos = 0
    lengths = _CENTRAL_LENGTHS.unpack_from
    size = len(cd)
    for _ in range(count):
        if pos + 46 > size:
            return None
        starts.append(pos)
        nlen, elen, clen = lengths(cd, pos + 28)
        pos += 46 + nlen + elen + clen
    return np.array(starts, dtype=np.int64) if pos == size else None


def _rows(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes at each start, one row each."""
    return buf[starts[:, None] + np.arange(width, dtype=np.int64)]


def _field(rows: np.ndarray, at: int, dtype: str) -> np.ndarray:
    """The little-endian integer field at byte `at` of every row."""
    width = np.dtype(dtype).itemsize
    return np.ascontiguousarray(rows[:, at : at + width]).view(dtype)[:, 0]


def _central_entries(
    cd: bytes, count: int, cd_offset: int, name: str, bad: Any
) -> tuple[list[str], list[int], list[int], list[int]]:
    """The central directory read entry by entry (zip64 fields included), raising the
    first problem in entry order: names, sizes, CRC-32s, local header offsets."""
    names: list[str] = []
    sizes: list[int] = []
    crcs: list[int] = []
    locals_at: list[int] = []
    pos = 0
    for _ in range(count):
        if pos + 46 > len(cd):
            raise bad("the central directory is shorter than its entry count")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, loc) = (
            _CENTRAL.unpack_from(cd, pos)
        )
        if sig != 0x02014B50:
            raise bad(f"bad central directory entry at offset {cd_offset + pos}")
        end = pos + 46 + nlen + elen + clen
        if end > len(cd):
            raise bad("a central directory entry runs past the directory")
        try:
            rname = cd[pos + 46 : pos + 46 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            raise bad("a record name is not UTF-8") from None
        want = [f for f, v in (("u", usize), ("c", csize), ("o", loc)) if v == 0xFFFFFFFF]
        if want:
            big = _zip64_extra(cd[pos + 46 + nlen : pos + 46 + nlen + elen], want, name)
            usize, csize, loc = big.get("u", usize), big.get("c", csize), big.get("o", loc)
        if flags & 1:
            raise bad(f"record {rname!r} is encrypted")
        # torch.save stores every record as is (method 0); a compressed one would have to
        # be inflated before its size could be trusted, and storages could not be read in
        # place, so they are refused, as documented
        if method != 0:
            what = "compressed (deflate)" if method == 8 else f"compressed (method {method})"
            raise bad(
                f"record {rname!r} is {what}; torch.save never compresses, and tensorfile "
                "reads only stored records (load it with torch.load and save it again)"
            )
        if csize != usize:
            raise bad(f"stored record {rname!r} has different compressed and plain sizes")
        names.append(rname)
        sizes.append(usize)
        crcs.append(crc)
        locals_at.append(loc)
        pos = end
    return names, sizes, crcs, locals_at


def read_directory(
    read: Any, file_nbytes: int, name: str, read_many: Any = None
) -> list[ZipRecord]:
    """Parses and checks the central directory. `read(nbytes, offset)` reads the file;
    `read_many(offsets, sizes)` reads many sorted, disjoint ranges into one bytes object
    (by default one `read` each)."""

    def bad(message: str) -> FormatError:
        return FormatError(f"{name}: invalid torch.save zip file: {message}")

    tail_nbytes = min(file_nbytes, 22 + 65535 + 20)
    tail = read(tail_nbytes, file_nbytes - tail_nbytes)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (
        at + 22 > len(tail) or at + 22 + _EOCD.unpack_from(tail, at)[7] != len(tail)
    ):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise bad("no end-of-central-directory record (truncated or not a zip)")
    _, disk, cd_disk, n_here, n_total, cd_nbytes, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_offset = file_nbytes - tail_nbytes + at
    if 0xFFFF in (n_here, n_total) or 0xFFFFFFFF in (cd_nbytes, cd_offset):
        if at < 20:
            raise bad("zip64 end-of-central-directory locator missing")
        sig, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(tail, at - 20)
        if sig != 0x07064B50 or eocd64_offset + 56 > eocd_offset:
            raise bad("bad zip64 end-of-central-directory locator")
        raw = read(56, eocd64_offset)
        if len(raw) != 56:
            raise bad("truncated zip64 end-of-central-directory record")
        sig, _, _, _, disk, cd_disk, n_here, n_total, cd_nbytes, cd_offset = _EOCD64.unpack(raw)
        if sig != 0x06064B50:
            raise bad("bad zip64 end-of-central-directory record")
        eocd_offset = eocd64_offset
    if disk != 0 or cd_disk != 0 or n_here != n_total:
        raise bad("multi-part zip archives are not supported")
    if cd_offset + cd_nbytes > eocd_offset:
        raise bad("the central directory runs past its end record")
    cd = read(cd_nbytes, cd_offset)
    if len(cd) != cd_nbytes:
        raise bad("truncated central directory")
    # Every entry's fields at once; an entry that is wrong or unusual (zip64 fields)
    # sends the whole directory through the reader that words the first problem.
    starts = _entry_starts(cd, n_total)
    if starts is None:
        _central_entries(cd, n_total, cd_offset, name, bad)
        raise bad("trailing bytes in the central directory")
    rows = _rows(np.frombuffer(cd, dtype=np.uint8), starts, 46)
    sig, flags, method = _field(rows, 0, "<u4"), _field(rows, 8, "<u2"), _field(rows, 10, "<u2")
    crc, csize, usize = _field(rows, 16, "<u4"), _field(rows, 20, "<u4"), _field(rows, 24, "<u4")
    nlen, loc = _field(rows, 28, "<u2").astype(np.int64), _field(rows, 42, "<u4").astype(np.int64)
    unusual = (
        (sig != 0x02014B50)
        | (flags & 1 != 0)
        | (method != 0)
        | (csize != usize)
        | (usize == 0xFFFFFFFF)
        | (csize == 0xFFFFFFFF)
        | (loc == 0xFFFFFFFF)
    )
    name_at = starts + 46
    raw_names = [cd[a:b] for a, b in zip(name_at.tolist(), (name_at + nlen).tolist())]
    try:
        names = [b.decode("utf-8") for b in raw_names]
    except UnicodeDecodeError:
        unusual[:] = True
    if unusual.any():
        names, sizes_u, crcs, loc_list = _central_entries(cd, n_total, cd_offset, name, bad)
        raw_names = [n.encode("utf-8") for n in names]
        nlen = np.array([len(b) for b in raw_names], dtype=np.int64)
        usize = np.array(sizes_u, dtype=np.uint64)
        crc = np.array(crcs, dtype=np.uint64)
        loc = np.array(loc_list, dtype=np.int64)
    # Local headers: their name and extra lengths give where each record's data starts.
    # Each is read with the name it should carry, all in one batch of sorted ranges.
    order = np.argsort(loc, kind="stable")
    sizes = 30 + nlen[order]
    offsets = loc[order]
    ends = offsets + sizes
    if len(order) > 1 and (ends[:-1] > offsets[1:]).any():
        k = int(np.flatnonzero(ends[:-1] > offsets[1:])[0])
        raise bad(f"records {names[order[k]]!r} and {names[order[k + 1]]!r} overlap")
    if len(order) and ends[-1] > file_nbytes:
        raise bad(f"record {names[order[-1]]!r} points past the end of the file")
    offset_list, size_list = offsets.tolist(), sizes.tolist()
    heads = (read_many or (lambda o, n: _read_each(read, o, n)))(offset_list, size_list)
    if len(heads) != int(sizes.sum()):
        raise bad("a local header points past the end of the file")
    hb = np.frombuffer(heads, dtype=np.uint8)
    head_at = np.cumsum(sizes) - sizes
    heads_rows = _rows(hb, head_at, 30)
    lsig, lnlen = _field(heads_rows, 0, "<u4"), _field(heads_rows, 26, "<u2")
    lelen = _field(heads_rows, 28, "<u2").astype(np.int64)
    want = b"".join([raw_names[i] for i in order.tolist()])
    got_at = np.repeat(head_at + 30 - (np.cumsum(nlen[order]) - nlen[order]), nlen[order])
    got_at += np.arange(len(want), dtype=np.int64)
    same = hb[got_at] == np.frombuffer(want, dtype=np.uint8)
    if (lsig != 0x04034B50).any() or (lnlen != nlen[order]).any() or not same.all():
        for k, i in enumerate(order.tolist()):
            if lsig[k] != 0x04034B50:
                raise bad(f"record {names[i]!r} has no local header at offset {offsets[k]}")
            at = int(head_at[k]) + 30
            if lnlen[k] != nlen[i] or heads[at : at + nlen[i]] != raw_names[i]:
                raise bad(f"record {names[i]!r}: local and central names differ")
    data_at = np.empty(len(order), dtype=np.int64)
    data_at[order] = ends + lelen
    nbytes = usize.astype(np.int64)
    by_place = np.lexsort((data_at + nbytes, data_at))
    begins, finishes = data_at[by_place], (data_at + nbytes)[by_place]
    if len(by_place) > 1 and (begins[1:] < finishes[:-1]).any():
        k = int(np.flatnonzero(begins[1:] < finishes[:-1])[0])
        n0, n1 = names[by_place[k]], names[by_place[k + 1]]
        raise bad(f"records {n0!r} and {n1!r} overlap")
    if len(by_place) and finishes[-1] > cd_offset:
        raise bad(f"record {names[by_place[-1]]!r} runs into the central directory")
    return [
        ZipRecord(n, d, u, c)
        for n, d, u, c in zip(names, data_at.tolist(), nbytes.tolist(), crc.tolist())
    ]


def open_archive(
    read: Any, file_nbytes: int, torch: Any, name: str, read_many: Any = None
) -> TorchArchive:
    """Parses the zip and the pickle; checks every tensor against its storage record."""
    records = read_directory(read, file_nbytes, name, read_many)
    if not records:
        raise FormatError(f"{name}: invalid torch.save zip file: the archive is empty")
    prefix = records[0].name.split("/", 1)[0]
    by_name: dict[str, ZipRecord] = {}
    for r in records:
        if not r.name.startswith(prefix + "/"):
            raise FormatError(
                f"{name}: invalid torch.save zip file: record {r.name!r} is outside {prefix}/"
            )
        if r.name in by_name:
            raise FormatError(f"{name}: invalid torch.save zip file: duplicate record {r.name!r}")
        by_name[r.name] = r
    pkl = by_name.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise FormatError(f"{name}: invalid torch.save zip file: no {prefix}/data.pkl record")
    order = by_name.get(f"{prefix}/byteorder")
    if order is not None and _record_bytes(read, order, name, 16) != b"little":
        raise FormatError(f"{name}: big-endian torch.save files are not supported")
    version_rec = by_name.get(f"{prefix}/version") or by_name.get(f"{prefix}/.data/version")
    version = (
        _record_bytes(read, version_rec, name, 64).decode("ascii", "replace").strip()
        if version_rec
        else ""
    )
    data = _record_bytes(read, pkl, name, MAX_PICKLE_NBYTES)
    dprefix = f"{prefix}/data/"
    storage_names = {r.name[len(dprefix) :] for r in records if r.name.startswith(dprefix)}
    root, tensors, storages = unpickle(data, torch, storage_names, name)
    storage_records = []
    for ref in storages:
        rec = by_name[dprefix + ref.key]
        want = ref.numel * TORCH_ITEMSIZE[ref.dtype]
        if rec.nbytes != want:
            raise FormatError(
                f"{name}: storage {ref.key!r} holds {rec.nbytes} bytes but its pickle entry needs {want}"
            )
        storage_records.append(rec)
    # What torch would refuse when it builds the tensor is refused here, before any
    # read, so every reader (load, open, inspect, verify, convert) says the same.
    for t in tensors:
        nbytes = storage_records[t.storage.index].nbytes
        itemsize = TORCH_ITEMSIZE[t.dtype]
        if t.requires_grad and t.dtype not in TORCH_GRAD_DTYPES:
            raise FormatError(
                f"{name}: a tensor of dtype {t.dtype} has requires_grad set, which only "
                "floating point and complex tensors can have"
            )
        if t.meta.get("conj") and not t.dtype.startswith("complex"):
            raise FormatError(
                f"{name}: a tensor of dtype {t.dtype} carries the conjugate flag, which only "
                "complex tensors can"
            )
        if 0 in t.shape:
            if t.offset * itemsize > nbytes:
                raise FormatError(
                    f"{name}: an empty tensor starts at byte {t.offset * itemsize} of storage "
                    f"{t.storage.key!r}, past its end ({nbytes} bytes)"
                )
            continue
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.strides))
        if (last + 1) * itemsize > nbytes:
            raise FormatError(
                f"{name}: a tensor of shape {t.shape} reaches byte {(last + 1) * itemsize} of storage "
                f"{t.storage.key!r}, which holds {nbytes}"
            )
    return TorchArchive(
        root, tensors, storages, storage_records, prefix, version, file_nbytes, len(data)
    )


def _record_bytes(read: Any, rec: ZipRecord, name: str, limit: int) -> bytes:
    if rec.nbytes > limit:
        raise FormatError(f"{name}: record {rec.name!r} is larger than the {limit}-byte limit")
    raw = read(rec.nbytes, rec.data_offset)
    if len(raw) != rec.nbytes:
        raise FormatError(f"{name}: record {rec.name!r} is truncated")
    if zlib.crc32(raw) != rec.crc32 and rec.crc32 != 0:
        raise FormatError(f"{name}: record {rec.name!r} fails its zip CRC-32 check (damaged)")
    return raw


# --------------------------------------------------------------------------- object graph


def key_text(k: Any) -> str:
    """A dict key as a key path spells it: str(k), except that an int past Python's
    int-to-str limit (4300 digits by default), alone or in a tuple, is written by its bit
    length, so naming a path never fails and stays short. Two such keys may then share a
    path, which readers report as ambiguous, as for any other collision."""
    if type(k) is str:
        return k
    try:
        return str(k)
    except ValueError:
        return _bounded_text(k)


def _bounded_text(k: Any) -> str:
    if type(k) is int:
        try:
            return str(k)
        except ValueError:
            return f"<int of {k.bit_length()} bits>"
    if (
        type(k) is tuple
    ):  # tuples in keys are nested at most MAX_DEPTH deep (picklebounds.Budget.check_key)
        inner = ", ".join(map(_bounded_text, k))
        return f"({inner},)" if len(k) == 1 else f"({inner})"
    return repr(k)


def walk_records(root: Any, visit_key: Any = None) -> None:
    """Calls visit_key(path, record) for each tensor record reachable through dicts,
    lists and tuples, in order; raises FormatError past MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    seen: set[int] = set()
    while stack:
        node, prefix, depth = stack.pop()
        if isinstance(node, TensorRecord):
            visit_key(prefix, node)
            continue
        if depth > MAX_DEPTH:
            raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            items = [(key_text(k), v) for k, v in node.items()]
        elif type(node) in (list, tuple):
            items = [(str(i), v) for i, v in enumerate(node)]
        else:
            continue
        if id(node) in seen and isinstance(node, (dict, list)):
            continue  # shared or cyclic containers are listed once
        seen.add(id(node))
        stack.extend((v, f"{prefix}.{k}" if prefix else k, depth + 1) for k, v in reversed(items))


def substitute(root: Any, tensors: list[Any]) -> Any:
    """Replaces every TensorRecord in the graph by tensors[record.index], in place for
    dicts and lists, rebuilding tuples. Cycles through tuples holding tensors are refused."""
    done: dict[int, Any] = {}
    active: set[int] = set()

    def fix(node: Any, depth: int) -> Any:
        if isinstance(node, TensorRecord):
            return tensors[node.index]
        if isinstance(node, StorageRef):
            raise FormatError("bare storages (not tensors) are not supported")
        t = type(node)
        if not (isinstance(node, (dict, list)) or t is tuple or t in (set, frozenset)):
            return node
        key = id(node)
        if key in done:
            return done[key]
        if depth > MAX_DEPTH:
            raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            done[key] = node
            for k in list(node):
                if isinstance(k, TensorRecord):
                    raise FormatError("a tensor used as a dict key is not supported")
                v = node[k]
                nv = fix(v, depth + 1)
                if nv is not v:
                    node[k] = nv
            attrs = getattr(node, "__dict__", None)
            if attrs:
                for k, v in list(attrs.items()):
                    attrs[k] = fix(v, depth + 1)
            return node
        if isinstance(node, list):
            done[key] = node
            for i, v in enumerate(node):
                nv = fix(v, depth + 1)
                if nv is not v:
                    node[i] = nv
            return node
        if t in (set, frozenset):
            if any(isinstance(v, TensorRecord) for v in node):
                raise FormatError("tensors inside a set are not supported")
            done[key] = node
            return node
        if key in active:
            raise FormatError("a tuple that contains itself is not supported")
        active.add(key)
        items = [fix(v, depth + 1) for v in node]
        active.discard(key)
        out = node if all(a is b for a, b in zip(items, node)) else tuple(items)
        done[key] = out
        return out

    return fix(root, 0)


def storage_table(archive: TorchArchive) -> dict[str, np.ndarray]:
    return {
        "offsets": np.array([r.data_offset for r in archive.storage_records], dtype=np.uint64),
        "nbytes": np.array([r.nbytes for r in archive.storage_records], dtype=np.uint64),
        "crc32": np.array([r.crc32 for r in archive.storage_records], dtype=np.uint32),
    }


def layout(archive: TorchArchive, torch: Any, name: str, file_nbytes: int) -> Layout:
    """The archive as a trusted Layout: one tensor row per record, one storage per
    storage record, the zip CRC-32s as the stored checksums."""
    rows: list[TensorRow] = []
    storage_tensors: list[list[int]] = [[] for _ in archive.storages]
    for rec in archive.records:
        flags = (FLAG_REQUIRES_GRAD if rec.requires_grad else 0) | (
            FLAG_PARAMETER if rec.parameter else 0
        )
        itemsize = TORCH_ITEMSIZE[rec.dtype]
        rows.append(
            TensorRow(
                "torch",
                rec.storage.index,
                rec.dtype,
                rec.shape,
                rec.strides,
                rec.offset * itemsize,
                flags,
            )
        )
        storage_tensors[rec.storage.index].append(rec.index)
    devices = []
    for ref in archive.storages:
        try:
            devices.append(str(torch.device(ref.location)))
        except RuntimeError:
            raise FormatError(
                f"{name}: storage {ref.key!r} has an invalid location {ref.location!r}"
            ) from None
    table = storage_table(archive)
    return Layout(
        tree=None,
        tensors=rows,
        storage_kind=["torch"] * len(archive.storages),
        storage_device=devices,
        storage_nbytes=table["nbytes"],
        storage_offsets=table["offsets"],
        storage_crcs=table["crc32"],
        storage_tensors=storage_tensors,
        metadata={},
        header_end=0,
        file_nbytes=file_nbytes,
        minor=0,
        format="torch.save",
        crc_kind="crc32",
        canonical_gaps=False,
        version=archive.version,
        header_nbytes=archive.pickle_nbytes,
        archive=archive,
    )
