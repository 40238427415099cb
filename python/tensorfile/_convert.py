"""Whole-file work for the command line, in bounded memory: full verification, conversion
between formats and diffs. Storages are streamed through one reusable buffer: runs of
small ones are read together (checksums computed by the engine as they arrive), large
ones in chunks whose checksums are continued from one chunk to the next."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _config, _engine, _files, _io, _numpy, _remote, _torch, api
from ._dtypes import ITEMSIZE, TORCH_ITEMSIZE
from ._errors import FormatError
from ._reader import Reader, open_reader
from ._tree import Builder, Flattener, decode_key_for_path, no_gc
from .formats import (
    FLAG_PARAMETER,
    FLAG_REQUIRES_GRAD,
    Layout,
    native,
    safetensors,
    torchzip,
    torchzip_writer,
)

CHUNK_NBYTES = 64 << 20  # the streaming buffer; memory use is about this plus one tensor

Progress = Callable[[int], None]


def no_progress(_: int) -> None:
    pass


class StorageStream:
    """Reads a reader's storages in file order through one reusable buffer, checking each
    against the checksum the file stores for it: runs of small storages are read together
    (checksums computed by the engine as they arrive), large ones in chunks whose
    checksums are continued from one chunk to the next. Memory: the buffer."""

    def __init__(self, reader: Reader, threads: int, chunk_nbytes: int = CHUNK_NBYTES) -> None:
        if reader.src.fd is None and reader.src.remote is None:
            raise ValueError(f"{reader.name}: pass a path (streams cannot be read this way)")
        self.reader = reader
        self.remote = reader.src.remote  # an object: ranged GETs instead of preads
        self.lay = reader.layout
        self.threads = threads
        self.chunk = chunk_nbytes
        self.buf = np.empty(chunk_nbytes, dtype=np.uint8)
        self.base = self.buf.ctypes.data
        self.kind = self.lay.crc_kind
        self.zip = self.kind == "crc32"

    def _check(self, s: int, got: int) -> None:
        if self.kind != "none":
            _io.check_storage_crcs(self.reader, [s], np.array([got], dtype=np.uint32))

    def batches(self, which: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Groups storages `which` (sorted by file offset) into runs that fit the buffer;
        yields (storages, their offsets in the buffer); a storage larger than the buffer
        comes alone with offsets [-1]: read it with `chunks`."""
        nbytes = self.lay.storage_nbytes
        fd_of = self.reader.byte_source
        i = 0
        while i < len(which):
            s = which[i]
            if int(nbytes[s]) > self.chunk:
                yield [s], [-1]
                i += 1
                continue
            run: list[int] = []
            at: list[int] = []
            used = 0
            fd = fd_of(s)[0]  # a run is read from one file
            while (
                i < len(which)
                and int(nbytes[which[i]]) <= self.chunk - used
                and fd_of(which[i])[0] == fd
            ):
                run.append(which[i])
                at.append(used)
                used += -(-int(nbytes[which[i]]) // 64) * 64  # keep every start 64-byte aligned
                i += 1
            yield run, at

    def read(self, run: list[int], at: list[int], gap_end: int | None) -> None:
        """Reads a run into the buffer and checks its checksums; with `gap_end`, also that
        every byte between the run's storages and up to `gap_end` is zero padding."""
        lay = self.lay
        nb = lay.storage_nbytes[run]
        full = nb > 0
        if not full.any() and gap_end is None:
            return
        ptrs = np.asarray(at, dtype=np.uint64) + np.uint64(self.base)
        crcs = np.zeros(len(run), dtype=np.uint32)
        sources = [self.reader.byte_source(s) for s in run]
        offs = np.array([off for _, off in sources], dtype=np.uint64)
        if full.any() and self.remote is not None:
            self.remote.read_ranges_into(
                [
                    (int(o), _io.raw_view(int(p), int(n)))
                    for p, n, o in zip(ptrs[full], nb[full], offs[full])
                ],
                part_nbytes=_config.remote_part_nbytes(),
                concurrency=_config.remote_concurrency(),
            )
            if self.kind != "none":
                crcs[full] = _io.checksum_host(
                    ptrs[full], nb[full], threads=self.threads, zip_crc=self.zip
                )
        elif full.any():
            crcs[full] = _io.read_host(
                sources[0][0],
                self.reader.name,
                ptrs[full],
                nb[full],
                offs[full],
                threads=self.threads,
                checksum=self.kind != "none",
                zip_crc=self.zip,
                gaps=(int(offs[0]), gap_end) if gap_end is not None else None,
            )
        for s, c in zip(run, crcs.tolist()):
            if int(lay.storage_nbytes[s]):
                self._check(s, c)

    def chunks(self, s: int) -> Iterator[tuple[int, memoryview]]:
        """(offset in the storage, bytes) of a large storage, chunk by chunk; its checksum
        is checked after the last chunk."""
        nb = int(self.lay.storage_nbytes[s])
        fd, off = self.reader.byte_source(s)
        crc = 0
        for k in range(0, nb, self.chunk):
            n = min(self.chunk, nb - k)
            if self.remote is not None:
                self.remote.read_ranges_into(
                    [(off + k, self.buf[:n])],
                    part_nbytes=_config.remote_part_nbytes(),
                    concurrency=_config.remote_concurrency(),
                )
            else:
                _io.read_host(
                    fd, self.reader.name, [self.base], [n], [off + k], threads=self.threads
                )
            view = memoryview(self.buf.data)[:n]
            if self.kind != "none":
                crc = _engine.crc32_zip(view, crc) if self.zip else _engine.crc32c(view, crc)
            yield k, view
        self._check(s, crc)

    def tensor_view(self, i: int, at: int) -> np.ndarray:
        """Tensor i's bytes, as a uint8 numpy view of the buffer with the tensor's strides
        in bytes and an extra last axis for the element's bytes."""
        return _numpy.byte_view(self.lay.tensors[i], self.buf, at)


def _gap_end(reader: Reader, order: list[int], nxt: int) -> int | None:
    """Where the padding after storage order[nxt - 1] ends: at the next storage this
    file holds, or at its end (None: no padding rule, or a referenced storage)."""
    lay = reader.layout
    refs = lay.storage_refs
    if not lay.canonical_gaps or order[nxt - 1] in refs or reader.src.remote is not None:
        return None  # (the padding of an object is not fetched)
    if nxt < len(order) and order[nxt] not in refs:
        return int(lay.storage_offsets[order[nxt]])
    return lay.file_nbytes


def _sorted_storages(lay: Layout, which: list[int] | None = None) -> list[int]:
    """Storages in the order their bytes lie: this file's, then the referenced ones by
    the file and storage holding them."""
    idx = list(range(len(lay.storage_kind))) if which is None else which
    refs = lay.storage_refs
    return sorted(
        idx, key=lambda s: (1, *refs[s]) if s in refs else (0, "", int(lay.storage_offsets[s]))
    )


def _check_bools(stream: StorageStream, run: list[int], at: list[int]) -> None:
    lay = stream.lay
    for s, a in zip(run, at):
        for i in lay.storage_tensors[s]:
            if lay.tensors[i].dtype == "bool":
                _io.check_bool_bytes(stream.reader.name, i, stream.tensor_view(i, a))


def verify(
    path: str, progress: Progress = no_progress, num_threads: int | None = None
) -> dict[str, Any]:
    """Checks a file completely (structure, padding, every stored checksum, bool bytes)
    with bounded memory. Raises FormatError/ChecksumError naming the file; returns a summary."""
    with no_gc(), open_reader(path, True) as reader:
        stream = StorageStream(reader, _config.num_threads(num_threads))
        lay = reader.layout
        order = _sorted_storages(lay)
        pos = 0
        for run, at in stream.batches(order):
            pos += len(run)
            if at[0] < 0:
                (s,) = run
                bools = [i for i in lay.storage_tensors[s] if lay.tensors[i].dtype == "bool"]
                for _k, view in stream.chunks(s):
                    if bools:
                        _io.check_bool_bytes(reader.name, bools[0], np.frombuffer(view, np.uint8))
                    progress(len(view))
                end = _gap_end(reader, order, pos)
                if end is not None:
                    tail = int(lay.storage_offsets[s] + lay.storage_nbytes[s])
                    _io.check_padding(reader.name, reader.src.read(end - tail, tail), tail)
                continue
            stream.read(run, at, _gap_end(reader, order, pos))
            _check_bools(stream, run, at)
            progress(int(lay.storage_nbytes[run].sum()))
        return {
            "format": reader.format,
            "tensors": len(lay.tensors),
            "storages": len(order),
            "nbytes": int(lay.storage_nbytes.sum()),
        }


# --------------------------------------------------------------------------- convert


def placeholders(reader: Reader) -> tuple[Any, list[Any]]:
    """The file's object graph with a distinct stand-in tensor per tensor row, for the
    tree flattener; returns (graph, stand-ins by row)."""
    torch = sys.modules.get("torch")
    n = len(reader.layout.tensors)
    if torch is not None:
        stand = [torch.empty(0, device="meta") for _ in range(n)]
    else:
        stand = [np.empty(0) for _ in range(n)]
    if reader.layout.archive is not None:
        reader.key_index()  # substitute() fills the graph in place: name the keys first
        return torchzip.substitute(reader.layout.archive.root, stand), stand
    return Builder(lambda tag, i: stand[i]).build(reader.layout.tree), stand


def _to_native(reader: Reader, out: str, stream: StorageStream, progress: Progress) -> None:
    lay = reader.layout
    if reader.format != "tensorfile":
        graph, stand = placeholders(reader)
        flat = Flattener()
        tree = flat.flatten(graph)
        row_of = {id(t): i for i, t in enumerate(stand)}
        src_rows = [row_of[id(leaf)] for leaf in flat.leaves]
    else:
        tree = lay.tree
        src_rows = list(range(len(lay.tensors)))
    used = _sorted_storages(lay, sorted({lay.tensors[i].storage for i in src_rows}))
    new_index = {s: j for j, s in enumerate(used)}
    rows = []
    for i in src_rows:
        row = lay.tensors[i]
        if row.kind == "torch" and row.dtype not in ITEMSIZE["torch"]:
            raise FormatError(f"{reader.name}: dtype {row.dtype} cannot be written")
        if len(row.shape) > native.MAX_NDIM:
            raise ValueError(
                f"{reader.name}: tensor {i} has {len(row.shape)} dimensions; a tensorfile holds "
                f"at most {native.MAX_NDIM}, so it cannot be converted to one"
            )
        rows.append(row._replace(storage=new_index[row.storage]))
    sizes = [int(lay.storage_nbytes[s]) for s in used]
    offs = native.storage_offsets(sizes)
    devices = [
        d if native.valid_storage_device(d) else "cpu"
        for d in (lay.storage_device[s] for s in used)
    ]
    header, crc_pos = native.encode_header(
        tree,
        native.TensorTable.from_rows(rows),
        np.array(offs, dtype=np.uint64),
        np.array(sizes, dtype=np.uint64),
        devices,
        dict(lay.metadata),
    )
    if len(header) > native.MAX_HEADER_NBYTES:
        raise ValueError(f"{reader.name}: the converted header would exceed the format's limit")
    total = native.file_nbytes(len(header), offs, sizes)
    base = native.data_start(len(header))
    crcs = np.zeros(len(used), dtype=np.uint32)
    with _files.atomic_file(out, total, True) as fd:
        for run, at in stream.batches(used):
            if at[0] < 0:
                (s,) = run
                crc = 0
                dst = base + offs[new_index[s]]
                for k, view in stream.chunks(s):
                    c = _write(
                        fd, [stream.base], [len(view)], [dst + k], stream.threads, out, True
                    )[0]
                    crc = int(c) if k == 0 else _engine.crc32c_combine(crc, int(c), len(view))
                    progress(len(view))
                crcs[new_index[s]] = crc
                continue
            stream.read(run, at, None)
            nb = [int(lay.storage_nbytes[s]) for s in run]
            keep = [j for j, n in enumerate(nb) if n]
            if keep:
                got = _write(
                    fd,
                    [stream.base + at[j] for j in keep],
                    [nb[j] for j in keep],
                    [base + offs[new_index[run[j]]] for j in keep],
                    stream.threads,
                    out,
                    True,
                )
                for j, c in zip(keep, got.tolist()):
                    crcs[new_index[run[j]]] = c
            progress(sum(nb))
        native.set_checksums(header, crc_pos, crcs)
        _files.pwrite_all(fd, native.make_preamble(header, total) + bytes(header), 0)


def _write(
    fd: int,
    ptrs: list[int],
    nbytes: list[int],
    offsets: list[int],
    threads: int,
    path: str,
    crc: bool,
) -> np.ndarray:
    # the output is fsynced: start its disk writes early
    return _io.write_host(
        fd, path, ptrs, nbytes, offsets, threads=threads, checksum=crc, writeback=True
    )


def _to_torch(reader: Reader, out: str, stream: StorageStream, progress: Progress) -> None:
    """Writes the file as a torch.save zip (formats/torchzip_writer) that
    torch.load(weights_only=True) reads: the same object graph, dtypes, views and
    sharing. Storages stream from the source into their records; each record's zip
    CRC-32 is the source's verified one when it is a torch.save file, else computed."""
    torch = _torch.module(reader.name)
    lay = reader.layout
    keys = reader.key_index()  # before the stand-ins take the place of the records
    graph, stand = placeholders(reader)
    row_of = {id(t): i for i, t in enumerate(stand)}
    try:
        leaves = torchzip_writer.loadable_tensors(torch, graph, lambda x: id(x) in row_of)
    except ValueError as e:
        raise ValueError(f"{reader.name}: {e}") from None
    rows = [row_of[id(t)] for t in leaves]

    def where(i: int) -> str:
        return next((k for k, j in keys.items() if j == i), f"tensor {i}")

    members: dict[int, list[int]] = {}
    for i in rows:
        row = lay.tensors[i]
        if row.kind != "torch":
            raise ValueError(
                f"{reader.name}: {where(i)!r} is a numpy array, which torch.load(weights_only=True) "
                "does not load; convert to a tensorfile or safetensors file instead"
            )
        if row.offset % TORCH_ITEMSIZE[row.dtype]:
            raise ValueError(
                f"{reader.name}: {where(i)!r} starts inside a {row.dtype} element of its storage, "
                "which a torch tensor cannot"
            )
        members.setdefault(row.storage, []).append(i)
    used = _sorted_storages(lay, sorted(members))
    new_index = {s: j for j, s in enumerate(used)}
    storages = []
    for s in used:
        nb = int(lay.storage_nbytes[s])
        dtypes = {lay.tensors[i].dtype for i in members[s]}
        one = dtypes.pop() if len(dtypes) == 1 else None
        if one not in torchzip_writer.STORAGE_CLASS or nb % TORCH_ITEMSIZE[one]:
            one = None  # an UntypedStorage, its tensors rebuilt with their dtypes
        storages.append(torchzip_writer.StorageSpec(lay.storage_device[s], nb, one))
    archive = lay.archive
    specs = {}
    for t, i in zip(leaves, rows):
        row = lay.tensors[i]
        specs[id(t)] = torchzip_writer.TensorSpec(
            storage=new_index[row.storage],
            dtype=row.dtype,
            offset=row.offset // TORCH_ITEMSIZE[row.dtype],
            shape=tuple(row.shape),
            strides=tuple(row.strides),
            requires_grad=bool(row.flags & FLAG_REQUIRES_GRAD),
            parameter=bool(row.flags & FLAG_PARAMETER),
            meta=dict(archive.records[i].meta) if archive is not None else {},
        )
    pkl = torchzip_writer.encode_pickle(torch, graph, specs, storages)
    del graph, stand, leaves, specs
    prefix = torchzip_writer.PREFIX
    names = [f"{prefix}/data.pkl", f"{prefix}/byteorder"]
    names += [f"{prefix}/data/{j}" for j in range(len(used))] + [f"{prefix}/version"]
    small = {0: pkl, 1: b"little", len(names) - 1: torchzip_writer.VERSION}
    sizes = [len(pkl), 6, *(st.nbytes for st in storages), len(torchzip_writer.VERSION)]
    zl = torchzip_writer.plan_zip(names, sizes)
    crcs = [0] * len(names)
    for r, data in small.items():
        crcs[r] = zlib.crc32(data)
    # a torch.save source's records carry checked zip CRC-32s already (0: not computed)
    known = lay.storage_crcs if lay.crc_kind == "crc32" else np.zeros(len(lay.storage_kind))
    with _files.atomic_file(out, zl.total, True) as fd:
        for run, at in stream.batches(used):
            if at[0] < 0:
                (s,) = run
                r = 2 + new_index[s]
                crc = 0
                for k, view in stream.chunks(s):
                    _write(
                        fd,
                        [stream.base],
                        [len(view)],
                        [zl.data_offsets[r] + k],
                        stream.threads,
                        out,
                        False,
                    )
                    if not known[s]:
                        crc = _engine.crc32_zip(view, crc)
                    progress(len(view))
                crcs[r] = int(known[s]) or crc
                _files.pwrite_all(fd, zl.local_header(r, crcs[r]), zl.header_offsets[r])
                continue
            stream.read(run, at, None)
            run_nb = [int(lay.storage_nbytes[s]) for s in run]
            ptrs = [stream.base + a for a in at]
            todo = [j for j, s in enumerate(run) if run_nb[j] and not known[s]]
            got = _io.checksum_host(
                [ptrs[j] for j in todo],
                [run_nb[j] for j in todo],
                threads=stream.threads,
                zip_crc=True,
            )
            for j, c in zip(todo, got.tolist()):
                crcs[2 + new_index[run[j]]] = c
            heads = []
            for s in run:
                r = 2 + new_index[s]
                crcs[r] = int(known[s]) or crcs[r]
                heads.append(zl.local_header(r, crcs[r]))
            hbuf = np.frombuffer(b"".join(heads), dtype=np.uint8)
            src: list[int] = []
            lens: list[int] = []
            dst: list[int] = []
            hat = 0
            for j, s in enumerate(run):  # each header, then its data: in file order
                r = 2 + new_index[s]
                src += [hbuf.ctypes.data + hat]
                lens += [len(heads[j])]
                dst += [zl.header_offsets[r]]
                hat += len(heads[j])
                if run_nb[j]:
                    src += [ptrs[j]]
                    lens += [run_nb[j]]
                    dst += [zl.data_offsets[r]]
            _write(fd, src, lens, dst, stream.threads, out, False)
            progress(sum(run_nb))
        for r, data in small.items():
            _files.pwrite_all(fd, zl.local_header(r, crcs[r]) + data, zl.header_offsets[r])
        _files.pwrite_all(fd, zl.tail(crcs), zl.cd_offset)


def tensor_entries(reader: Reader) -> tuple[list[tuple[str, int]], list[str]]:
    """(key path, tensor row) of every tensor, and the key paths of values that are not
    tensors (safetensors cannot hold them)."""
    keys = reader.key_index()
    if reader.ambiguous:
        bad = sorted(reader.ambiguous)[0]
        raise ValueError(f"{reader.name}: key path {bad!r} names more than one tensor")
    return list(keys.items()), _plain_paths(reader)


def _plain_paths(reader: Reader) -> list[str]:
    out: list[str] = []
    if reader.layout.archive is not None:
        stack: list[tuple[Any, str]] = [(reader.layout.archive.root, "")]
        while stack and len(out) < 1000:
            node, p = stack.pop()
            if isinstance(node, torchzip.TensorRecord):
                continue
            if isinstance(node, dict):
                stack.extend((v, f"{p}.{k}" if p else str(k)) for k, v in node.items())
            elif type(node) in (list, tuple):
                stack.extend((v, f"{p}.{i}" if p else str(i)) for i, v in enumerate(node))
            else:
                out.append(p or "<root>")
        return out
    stack2: list[tuple[Any, str]] = [(reader.layout.tree, "")]
    while stack2 and len(out) < 1000:
        node, p = stack2.pop()
        if type(node) is list and node[0] in ("tensor", "ndarray"):
            continue
        if type(node) is list and node[0] in ("list", "tuple"):
            stack2.extend((c, f"{p}.{i}" if p else str(i)) for i, c in enumerate(node[1:]))
        elif type(node) is list and node[0] in ("dict", "odict"):
            first = 1 if node[0] == "dict" else 2
            for j in range(first, len(node), 2):
                k = node[j]
                name = k if type(k) is str else str(decode_key_for_path(k))
                stack2.append((node[j + 1], f"{p}.{name}" if p else name))
        else:
            out.append(p or "<root>")
    return out


def _copies(lay: Layout, entries: list[tuple[str, int]]) -> dict[str, Any]:
    """What writing `entries` (key path, tensor row) as separate tensors duplicates:
    {"tensors": entries sharing storage bytes with another, "nbytes": bytes written
    beyond the storage bytes they view, "keys": their key paths}."""
    by_storage: dict[int, list[tuple[str, int, int, int]]] = {}
    for key, i in entries:
        row = lay.tensors[i]
        item = ITEMSIZE[row.kind][row.dtype]
        numel = math.prod(row.shape)
        lo = hi = row.offset
        if numel:
            step = item if row.kind == "torch" else 1
            hi = lo + item + sum((d - 1) * st * step for d, st in zip(row.shape, row.strides))
        by_storage.setdefault(row.storage, []).append((key, lo, hi, numel * item))
    tensors, nbytes, keys = 0, 0, []
    for group in by_storage.values():
        if len(group) < 2:
            continue
        covered, end = 0, -1
        for _k, lo, hi, _n in sorted(group, key=lambda g: g[1]):  # the union of the spans
            if hi > max(lo, end):
                covered += hi - max(lo, end)
                end = hi
        extra = sum(g[3] for g in group) - covered
        if extra > 0:
            tensors += len(group)
            nbytes += extra
            keys += [g[0] for g in group]
    return {"tensors": tensors, "nbytes": nbytes, "keys": keys}


def _to_safetensors(
    reader: Reader, out: str, stream: StorageStream, progress: Progress, skip_plain: bool
) -> tuple[list[str], dict[str, Any]]:
    lay = reader.layout
    entries, plain = tensor_entries(reader)
    if plain and not skip_plain:
        shown = ", ".join(plain[:5])
        raise ValueError(
            f"{reader.name}: safetensors holds only tensors, and this file also holds other values "
            f"(at {shown}{', ...' if len(plain) > 5 else ''}); pass --skip-non-tensors to leave them out"
        )
    meta = []  # (name, dtype, shape, nbytes, row, -itemsize)
    for key, i in entries:
        kind, dtype, shape = lay.tensors[i].kind, lay.tensors[i].dtype, lay.tensors[i].shape
        name = dtype  # torch and numpy name the dtypes safetensors holds alike
        if name not in safetensors.NAME_OF:
            raise ValueError(
                f"{reader.name}: {key!r} has dtype {dtype}, which safetensors cannot hold"
            )
        item = ITEMSIZE[kind][dtype]
        meta.append((key, name, list(shape), math.prod(shape) * item, i, -item))
    meta.sort(key=lambda m: (m[5], m[0]))
    head, rel = safetensors.encode_header(
        [(m[0], m[1], m[2], m[3]) for m in meta], dict(lay.metadata)
    )
    dst_of: dict[int, list[tuple[int, int]]] = {}  # tensor row -> [(dst offset, nbytes)]
    for m, r in zip(meta, rel):
        dst_of.setdefault(m[4], []).append((len(head) + r, m[3]))
    total = len(head) + sum(m[3] for m in meta)
    needed = _sorted_storages(lay, sorted({lay.tensors[i].storage for _, i in entries}))
    with _files.atomic_file(out, total, True) as fd:
        for run, at in stream.batches(needed):
            if at[0] < 0:
                (s,) = run
                rows = [i for i in lay.storage_tensors[s] if i in dst_of]
                if all(_covers(lay, i, s) for i in rows):  # stream it chunk by chunk
                    for k, view in stream.chunks(s):
                        for i in rows:
                            for dst, _n in dst_of[i]:
                                _write(
                                    fd,
                                    [stream.base],
                                    [len(view)],
                                    [dst + k],
                                    stream.threads,
                                    out,
                                    False,
                                )
                        progress(len(view))
                    continue
                big = StorageStream(reader, stream.threads, int(lay.storage_nbytes[s]))
                big.read([s], [0], None)
                _emit(big, fd, out, [s], [0], dst_of)
                progress(int(lay.storage_nbytes[s]))
                continue
            stream.read(run, at, None)
            _emit(stream, fd, out, run, at, dst_of)
            progress(int(lay.storage_nbytes[run].sum()))
        _files.pwrite_all(fd, head, 0)
    return plain, _copies(lay, entries)


def _covers(lay: Layout, i: int, s: int) -> bool:
    """Tensor i is its whole storage s, contiguous, from byte 0."""
    kind, _s, dtype, shape, strides, off, _ = lay.tensors[i]
    item = ITEMSIZE[kind][dtype]
    want = []
    step = 1 if kind == "torch" else item
    for d in reversed(shape):
        want.append(step)
        step *= max(d, 1)
    want.reverse()
    contiguous = all(st == w for d, st, w in zip(shape, strides, want) if d > 1)
    return off == 0 and contiguous and math.prod(shape) * item == int(lay.storage_nbytes[s])


def _emit(
    stream: StorageStream,
    fd: int,
    out: str,
    run: list[int],
    at: list[int],
    dst_of: dict[int, list[tuple[int, int]]],
) -> None:
    lay = stream.lay
    ptrs: list[int] = []
    sizes: list[int] = []
    offs: list[int] = []
    keep: list[Any] = []
    for s, a in zip(run, at):
        for i in lay.storage_tensors[s]:
            if i not in dst_of:
                continue
            v = stream.tensor_view(i, a)
            if not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)
                keep.append(v)
            for dst, n in dst_of[i]:
                if n:
                    ptrs.append(v.ctypes.data)
                    sizes.append(n)
                    offs.append(dst)
    order = sorted(range(len(offs)), key=offs.__getitem__)
    if order:
        _write(
            fd,
            [ptrs[j] for j in order],
            [sizes[j] for j in order],
            [offs[j] for j in order],
            stream.threads,
            out,
            False,
        )
    del keep


def convert(
    src: str,
    dst: str,
    to: str,
    progress: Progress = no_progress,
    *,
    skip_non_tensors: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Converts any file tensorfile reads (or a torch.distributed.checkpoint directory) to
    a tensorfile, safetensors or torch.save file (`to`: "tensorfile", "safetensors",
    "torch"; or a DCP directory, "dcp"), atomically, verifying the
    source's checksums on the way, with memory bounded by the streaming buffer plus the
    largest non-contiguous tensor."""
    target = _remote.resolve(dst)
    if isinstance(target, _remote.ObjectURL):  # converted locally, then uploaded whole
        if src == dst:
            raise ValueError(f"{src} and {dst} are the same object; converting would replace it")
        with tempfile.TemporaryDirectory(prefix="tensorfile-convert-") as tmp:
            if to == "dcp":
                raise ValueError(f"{dst}: converting to a DCP directory needs a local path")
            local = os.path.join(tmp, "out")
            done = convert(
                src, local, to, progress, skip_non_tensors=skip_non_tensors, num_threads=num_threads
            )
            _io.upload_file(local, target)
        return done
    if not _remote.has_url_scheme(src) and _files.same_file(src, dst):
        raise ValueError(f"{src} and {dst} are the same file; converting would replace it")
    threads = _config.num_threads(num_threads)
    if to == "torch" and os.path.isdir(src):
        raise ValueError(
            f"{src}: a torch.distributed.checkpoint directory converts to a tensorfile, "
            "safetensors or DCP; convert it to a tensorfile first, then that to a torch.save file"
        )
    if os.path.isdir(src):
        from . import dcp

        if to == "dcp":  # directory to directory: through memory
            dcp.state_dict_to_dcp(dcp.dcp_to_state_dict(src), dst)
            return {"from": "dcp", "to": to, "skipped": []}
        return dcp.convert_checkpoint(
            src, dst, to, progress, skip_non_tensors=skip_non_tensors, num_threads=num_threads
        )
    if to == "dcp":
        return _convert_in_memory(api.load(src, map_location="cpu"), dst, to, skip_non_tensors)
    with no_gc(), open_reader(src, True) as reader:
        stream = StorageStream(reader, threads)
        skipped: list[str] = []
        info: dict[str, Any] = {"from": reader.format, "to": to}
        if to == "tensorfile":
            _to_native(reader, dst, stream, progress)
        elif to == "safetensors":
            skipped, info["duplicated"] = _to_safetensors(
                reader, dst, stream, progress, skip_non_tensors
            )
        elif to == "torch":
            _to_torch(reader, dst, stream, progress)
        else:
            raise ValueError(f"unknown target format {to!r}")
        info["skipped"] = skipped
        return info


def _convert_in_memory(state: Any, dst: str, to: str, skip_non_tensors: bool) -> dict[str, Any]:
    """A file to a DCP directory, through memory (DCP's planner takes a whole state dict)."""
    if to != "dcp":
        raise ValueError(f"unknown target format {to!r}")
    from . import dcp

    dcp.state_dict_to_dcp(state, dst)
    return {"from": "file", "to": to, "skipped": []}


def flatten_tensors(obj: Any) -> tuple[dict[str, Any], list[str]]:
    torch = sys.modules.get("torch")
    flat: dict[str, Any] = {}
    plain: list[str] = []
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        node, p = stack.pop()
        if (torch is not None and isinstance(node, torch.Tensor)) or isinstance(node, np.ndarray):
            flat[p] = node
        elif isinstance(node, dict):
            stack.extend((v, f"{p}.{k}" if p else str(k)) for k, v in node.items())
        elif type(node) in (list, tuple):
            stack.extend((v, f"{p}.{i}" if p else str(i)) for i, v in enumerate(node))
        else:
            plain.append(p or "<root>")
    return flat, plain
