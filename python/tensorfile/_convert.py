"""Whole-file work for the command line, in bounded memory: full verification, conversion
between formats and diffs. Storages are streamed through one reusable buffer: runs of
small ones are read together (checksums computed by the engine as they arrive), large
ones in chunks whose checksums are continued from one chunk to the next."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _config, _engine, _files, _io, _numpy, api
from ._dtypes import ITEMSIZE
from ._errors import FormatError
from ._layout import Layout
from ._reader import Reader, open_reader
from ._tree import Builder, Flattener, decode_key_for_path, no_gc
from .formats import native, safetensors, torchzip

CHUNK_NBYTES = 64 << 20  # the streaming buffer; memory use is about this plus one tensor

Progress = Callable[[int], None]


def _nothing(_: int) -> None:
    pass


class StorageStream:
    """Reads a reader's storages in file order through one reusable buffer, checking each
    against the checksum the file stores for it: runs of small storages are read together
    (checksums computed by the engine as they arrive), large ones in chunks whose
    checksums are continued from one chunk to the next. Memory: the buffer."""

    def __init__(self, reader: Reader, threads: int, chunk_nbytes: int = CHUNK_NBYTES) -> None:
        if reader.src.fd is None:
            raise ValueError(f"{reader.name}: pass a path (streams cannot be read this way)")
        self.fd: int = reader.src.fd
        self.reader = reader
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
            while i < len(which) and int(nbytes[which[i]]) <= self.chunk - used:
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
        offs = lay.storage_offsets[run]
        if full.any():
            crcs[full] = _io.read_host(
                self.fd,
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
        off = int(self.lay.storage_offsets[s])
        crc = 0
        for k in range(0, nb, self.chunk):
            n = min(self.chunk, nb - k)
            _io.read_host(
                self.fd, self.reader.name, [self.base], [n], [off + k], threads=self.threads
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
    if not reader.layout.canonical_gaps:
        return None
    lay = reader.layout
    return int(lay.storage_offsets[order[nxt]]) if nxt < len(order) else lay.file_nbytes


def _sorted_storages(lay: Layout, which: list[int] | None = None) -> list[int]:
    idx = list(range(len(lay.storage_kind))) if which is None else which
    return sorted(idx, key=lambda s: int(lay.storage_offsets[s]))


def _check_bools(stream: StorageStream, run: list[int], at: list[int]) -> None:
    lay = stream.lay
    for s, a in zip(run, at):
        for i in lay.storage_tensors[s]:
            if lay.tensors[i].dtype == "bool":
                _io.check_bool_bytes(stream.reader.name, i, stream.tensor_view(i, a))


def verify(
    path: str, progress: Progress = _nothing, num_threads: int | None = None
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


def _placeholders(reader: Reader) -> tuple[Any, list[Any]]:
    """The file's object graph with a distinct stand-in tensor per tensor row, for the
    tree flattener; returns (graph, stand-ins by row)."""
    torch = sys.modules.get("torch")
    n = len(reader.layout.tensors)
    if torch is not None:
        stand = [torch.empty(0, device="meta") for _ in range(n)]
    else:
        stand = [np.empty(0) for _ in range(n)]
    if reader.layout.archive is not None:
        return torchzip.substitute(reader.layout.archive.root, stand), stand
    return Builder(lambda tag, i: stand[i]).build(reader.layout.tree), stand


def _to_native(reader: Reader, out: str, stream: StorageStream, progress: Progress) -> None:
    lay = reader.layout
    if reader.format != "tensorfile":
        graph, stand = _placeholders(reader)
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


def _to_safetensors(
    reader: Reader, out: str, stream: StorageStream, progress: Progress, skip_plain: bool
) -> list[str]:
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
    return plain


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
    progress: Progress = _nothing,
    *,
    skip_non_tensors: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Converts any file tensorfile reads (or a torch.distributed.checkpoint directory) to
    a tensorfile or safetensors file (or a DCP directory), atomically, verifying the
    source's checksums on the way, with memory bounded by the streaming buffer plus the
    largest non-contiguous tensor."""
    threads = _config.num_threads(num_threads)
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
        if to == "tensorfile":
            _to_native(reader, dst, stream, progress)
        elif to == "safetensors":
            skipped = _to_safetensors(reader, dst, stream, progress, skip_non_tensors)
        else:
            raise ValueError(f"unknown target format {to!r}")
        return {"from": reader.format, "to": to, "skipped": skipped}


def _convert_in_memory(state: Any, dst: str, to: str, skip_non_tensors: bool) -> dict[str, Any]:
    """A file to a DCP directory, through memory (DCP's planner takes a whole state dict)."""
    if to != "dcp":
        raise ValueError(f"unknown target format {to!r}")
    from . import dcp

    dcp.state_dict_to_dcp(state, dst)
    return {"from": "file", "to": to, "skipped": []}


def _flatten_tensors(obj: Any) -> tuple[dict[str, Any], list[str]]:
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


# --------------------------------------------------------------------------- diff


class _Side:
    """One side of a diff: a file opened lazily, or a DCP directory read whole."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: api.TensorFile | None = None
        self.flat: dict[str, Any] = {}
        if os.path.isdir(path):
            from . import dcp

            self.flat, _ = _flatten_tensors(dcp.dcp_to_state_dict(path))
            self.keys = list(self.flat)
        else:
            self.file = api.open(path)
            self.keys = self.file.keys()

    def describe(self, key: str) -> tuple[str, list[int]]:
        if self.file is None:
            t = self.flat[key]
            return str(t.dtype).removeprefix("torch."), list(t.shape)
        r = self.file._reader
        _kind, _s, dtype, shape, *_ = r.layout.tensors[r.key_index()[key]]
        return dtype, list(shape)

    def get(self, key: str) -> Any:
        return self.flat[key] if self.file is None else self.file.get(key, map_location="cpu")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| over elements, in float64 (complex: modulus), read in bounded chunks;
    two NaNs in the same place count as equal, a NaN against a number as inf."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().resolve_conj().resolve_neg().reshape(-1)
        b = b.detach().resolve_conj().resolve_neg().reshape(-1)
        cast = torch.complex128 if a.is_complex() else torch.float64
        worst = 0.0
        for k in range(0, a.numel(), 1 << 22):
            x, y = a[k : k + (1 << 22)].to(cast), b[k : k + (1 << 22)].to(cast)
            d = (x - y).abs()
            both = (
                torch.isnan(x) & torch.isnan(y)
                if not a.is_complex()
                else torch.isnan(x.abs()) & torch.isnan(y.abs())
            )
            d = torch.where(both, torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf))
            if d.numel():
                worst = max(worst, float(d.max()))
        return worst
    x = np.asarray(a).reshape(-1)
    y = np.asarray(b).reshape(-1)
    worst = 0.0
    for k in range(0, x.size, 1 << 22):
        xs = x[k : k + (1 << 22)].astype(np.complex128 if np.iscomplexobj(x) else np.float64)
        ys = y[k : k + (1 << 22)].astype(xs.dtype)
        d = np.abs(xs - ys)
        both = np.isnan(np.abs(xs)) & np.isnan(np.abs(ys))
        d = np.where(both, 0.0, np.nan_to_num(d, nan=math.inf))
        if d.size:
            worst = max(worst, float(d.max()))
    return worst


def diff(path_a: str, path_b: str, progress: Progress = _nothing) -> dict[str, Any]:
    """Compares the tensors of two files (any formats, or DCP directories) by key path:
    keys only in one, dtype or shape changes, and the max absolute difference of each
    common tensor. Reads one tensor pair at a time."""
    a, b = _Side(path_a), _Side(path_b)
    try:
        keys_b = set(b.keys)
        keys_a = set(a.keys)
        report: dict[str, Any] = {
            "only_in_a": [k for k in a.keys if k not in keys_b],
            "only_in_b": [k for k in b.keys if k not in keys_a],
            "changed": [],
            "max_abs_diff": {},
        }
        for key in a.keys:
            if key not in keys_b:
                continue
            da, db = a.describe(key), b.describe(key)
            if da != db:
                report["changed"].append({"key": key, "a": da, "b": db})
            elif 0 not in da[1] or not da[1]:
                report["max_abs_diff"][key] = _max_abs_diff(a.get(key), b.get(key))
            else:
                report["max_abs_diff"][key] = 0.0
            progress(1)
        report["identical"] = not (
            report["only_in_a"]
            or report["only_in_b"]
            or report["changed"]
            or any(v != 0 for v in report["max_abs_diff"].values())
        )
        return report
    finally:
        a.close()
        b.close()
