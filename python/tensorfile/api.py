"""save, load and open: argument handling, paths versus file-like objects, atomic replace."""

from __future__ import annotations

import ctypes
import math
import mmap as _mmap
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from . import _config, _cuda, _engine
from ._dtypes import TORCH_ITEMSIZE, numpy_name
from ._errors import ChecksumError, FormatError
from ._files import FileLike, PathLike, Source, atomic_file, phase, pwrite_all
from ._plan import check_metadata, plan_and_encode
from ._tree import Builder, key_index, no_gc
from .formats import native, safetensors, torchzip

# --------------------------------------------------------------------------- save


def save(
    obj: Any,
    f: FileLike,
    *,
    durable: bool = True,
    num_threads: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Saves `obj` (tensors, arrays, containers of them, plain values) to `f`.

    `f` is a path or a writable binary file-like object. For a path, the file is written
    beside the target under a temporary name, then renamed over it, so `f` holds the
    old file or the new one and never a mix; with `durable=True` (the default) the data
    and the rename are fsynced before this returns, so the file survives power loss.
    `metadata` is a str -> str dict stored in the header. Raises TypeError naming the key
    path of anything that cannot be saved; on any error the target is left as it was.
    Releases the GIL while bytes move; `num_threads` defaults to TENSORFILE_NUM_THREADS
    or the core count.
    """
    with no_gc():
        _save(obj, f, durable, num_threads, metadata)


def _save(
    obj: Any,
    f: FileLike,
    durable: bool,
    num_threads: int | None,
    metadata: dict[str, str] | None,
    saved_from: dict[int, str] | None = None,
) -> None:
    """`saved_from` maps id(tensor) to the device to record for its storage, for copies
    that stand in for tensors elsewhere (async_save's snapshots of CUDA tensors)."""
    plan, header, crc_pos = plan_and_encode(obj, metadata, saved_from)
    total = native.file_nbytes(len(header), plan.offsets, plan.nbytes)
    base = np.uint64(native.data_start(len(header)))
    threads = _config.num_threads(num_threads)
    task = _config.task_nbytes(write=True)
    if isinstance(f, (str, os.PathLike)):
        _save_path(os.fspath(f), plan, header, crc_pos, total, base, threads, task, durable)
    else:
        _save_stream(f, plan, header, crc_pos, total, base, threads, task)


def save_safetensors(
    tensors: dict[str, Any],
    path: PathLike,
    metadata: dict[str, str] | None = None,
    *,
    copy_shared: bool = False,
    durable: bool = True,
    num_threads: int | None = None,
) -> None:
    """Writes a flat dict of str -> tensor (torch, or numpy arrays) as a safetensors file,
    atomically like `save` (a temporary file, fsync, rename). Bytes go to the file
    straight from tensor memory; a non-contiguous tensor is written from a contiguous
    copy of itself. Tensors whose memory overlaps are refused, as safetensors refuses
    them, unless `copy_shared=True`, which stores each one's own bytes. Tensors are laid
    out widest element first, then by name, so every tensor is aligned to its element."""
    with no_gc():
        if not isinstance(tensors, dict):
            raise TypeError("tensorfile.save_safetensors: expected a dict of str -> tensor")
        meta = check_metadata(metadata)
        rows: list[
            tuple[int, str, str, list[int], int, int]
        ] = []  # -itemsize, name, dtype, shape, nbytes, ptr
        spans: list[tuple[int, int, str]] = []
        keep: list[Any] = []
        torch = sys.modules.get("torch")
        for name, t in tensors.items():
            if type(name) is not str:
                raise TypeError(f"tensorfile.save_safetensors: key {name!r} is not a str")
            dtype, shape, nbytes, ptr, span, data = _flat_tensor(torch, name, t)
            keep.append(data)
            rows.append(
                (
                    -(nbytes // max(1, math.prod(shape))) if nbytes else 0,
                    name,
                    dtype,
                    shape,
                    nbytes,
                    ptr,
                )
            )
            if span[1] > span[0]:
                spans.append((span[0], span[1], name))
        spans.sort()
        for (_, hi, a), (lo, _, b) in zip(spans, spans[1:]):
            if lo < hi and not copy_shared:
                raise ValueError(
                    f"tensorfile.save_safetensors: tensors {a!r} and {b!r} share memory, which safetensors "
                    "cannot express; pass copy_shared=True to store a copy of each, or clone one of them"
                )
        rows.sort(key=lambda r: (r[0], r[1]))
        head, offsets = safetensors.encode_header([(r[1], r[2], r[3], r[4]) for r in rows], meta)
        total = len(head) + sum(r[4] for r in rows)
        ptrs = np.array([r[5] for r in rows], dtype=np.uint64)
        sizes = np.array([r[4] for r in rows], dtype=np.uint64)
        offs = np.array(offsets, dtype=np.uint64) + np.uint64(len(head))
        full = sizes > 0
        spath = os.fspath(path)
        with atomic_file(spath, total, durable) as fd:
            if full.any():
                _engine.write_regions(
                    fd,
                    ptrs[full],
                    sizes[full],
                    offs[full],
                    _config.num_threads(num_threads),
                    _config.task_nbytes(write=True),
                    False,
                    spath,
                    writeback=durable,
                )
            pwrite_all(fd, head, 0)
        del keep


def _flat_tensor(
    torch: Any, name: str, t: Any
) -> tuple[str, list[int], int, int, tuple[int, int], Any]:
    """(dtype name, shape, nbytes, address of contiguous bytes, (lo, hi) memory span of the
    original, owner of the bytes) for one safetensors entry."""

    def refuse(why: str) -> TypeError:
        return TypeError(f"tensorfile.save_safetensors: cannot save {name!r}: {why}")

    if torch is not None and isinstance(t, torch.Tensor):
        if t.layout is not torch.strided or t.is_quantized:
            raise refuse(f"{t.layout} / quantized tensors are not supported")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in safetensors.NAME_OF:
            raise refuse(f"safetensors has no dtype for {t.dtype}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        span = (0, 0)
        if t.numel():
            lo = t.data_ptr()
            hi = lo + t.element_size() * (1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride())))
            span = (lo, hi)
        if t.is_conj() or t.is_neg() or not t.is_contiguous():
            t = t.resolve_conj().resolve_neg().contiguous()
        return dtype, list(t.shape), t.numel() * t.element_size(), t.data_ptr(), span, t
    if isinstance(t, np.ndarray):
        dname = numpy_name(t.dtype)
        if dname is None or not safetensors.numpy_supported(dname):
            raise refuse(f"numpy dtype {t.dtype} is not supported")
        span = (0, 0)
        if t.size:
            addr = t.__array_interface__["data"][0]
            lo = addr + sum((d - 1) * s for d, s in zip(t.shape, t.strides) if s < 0)
            hi = addr + t.itemsize + sum((d - 1) * s for d, s in zip(t.shape, t.strides) if s > 0)
            span = (lo, hi)
        data = np.ascontiguousarray(t)
        return dname, list(t.shape), data.nbytes, data.ctypes.data, span, data
    raise refuse(f"expected a tensor or numpy array, got {type(t).__name__}")


def _save_path(
    path: str,
    plan: Any,
    header: bytearray,
    crc_pos: int,
    total: int,
    base: np.uint64,
    threads: int,
    task: int,
    durable: bool,
) -> None:
    with atomic_file(path, total, durable) as fd:
        # Empty storages have no bytes, no padding, CRC 0; CUDA ones are staged (or
        # written with cuFile through a second, O_DIRECT descriptor of the same file).
        crcs = _cuda.write_storages(
            fd,
            path,
            f"/proc/self/fd/{fd}",
            plan.devices,
            plan.ptrs,
            plan.nbytes,
            plan.offsets + base,
            threads,
            task,
            writeback=durable,
        )
        native.set_checksums(header, crc_pos, crcs)
        head = native.make_preamble(header, total) + bytes(header)
        phase("header")
        pwrite_all(fd, head, 0)


def _raw_view(ptr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


def _save_stream(
    f: IO[bytes],
    plan: Any,
    header: bytearray,
    crc_pos: int,
    total: int,
    base: np.uint64,
    threads: int,
    task: int,
) -> None:
    if not hasattr(f, "write"):
        raise TypeError(
            f"tensorfile.save: f must be a path or a writable binary file object, got {type(f).__name__}"
        )
    ptrs, _host = _cuda.host_copies(plan.devices, plan.ptrs, plan.nbytes, plan.keepalive)
    crcs = _engine.checksum_regions(ptrs, plan.nbytes, threads, task)
    native.set_checksums(header, crc_pos, crcs)
    sizes = plan.nbytes.tolist()
    offsets = plan.offsets.tolist()
    f.write(native.make_preamble(header, total))
    f.write(bytes(header))
    cursor = native.PREAMBLE_NBYTES + len(header)
    zeros = bytes(native.ALIGN)
    for ptr, nb, off in zip(ptrs.tolist(), sizes, offsets):
        if nb == 0:
            continue
        at = int(base) + off
        if at > cursor:
            f.write(zeros[: at - cursor])
        f.write(_raw_view(ptr, nb))
        cursor = at + nb


# --------------------------------------------------------------------------- load


def _open_reader(f: FileLike, verify: bool = True) -> _Reader:
    """Opens `f` with the reader its first bytes call for: a tensorfile, a torch.save zip
    or a safetensors file (the name of the file plays no part)."""
    src = Source(f)
    try:
        head = src.read(native.PREAMBLE_NBYTES, 0)
        if head.startswith(native.MAGIC):
            return _Reader(src, head, verify)
        if torchzip.looks_like(head):
            return _TorchZipReader(src, head, verify)
        if safetensors.looks_like(head):
            return _SafetensorsReader(src, head, verify)
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise FormatError(
                f"{src.name}: this looks like a pickle: a legacy (before PyTorch 1.6) torch.save "
                "file or a plain pickle, which tensorfile does not load; re-save it with a current torch.save"
            )
        return _Reader(src, head, verify)  # reports the bad magic
    except BaseException:
        src.close()
        raise


class _Reader:
    """An open, validated tensorfile: the header is trusted, storages are read on demand.
    Subclasses read other formats into the same Layout; they differ in how the layout is
    parsed, how stored checksums are checked and how the object graph is rebuilt."""

    format = "tensorfile"
    crc_kind = "crc32c"  # what storage_crcs hold: "crc32c", "crc32" (zip) or "none"
    canonical_gaps = True  # the bytes between storages must be zero padding
    pin_memory = False  # CPU torch storages in pinned memory (load(pin_memory=True))

    def __init__(self, src: Source, raw: bytes, verify: bool = True) -> None:
        self.src = src
        try:
            self.name = self.src.name
            pre = native.parse_preamble(raw, self.src.nbytes, self.name)
            header_end = native.PREAMBLE_NBYTES + pre.header_nbytes
            upto = min(native.data_start(pre.header_nbytes), pre.file_nbytes)
            blob = self.src.read(upto - native.PREAMBLE_NBYTES, native.PREAMBLE_NBYTES)
            if len(blob) != upto - native.PREAMBLE_NBYTES:
                raise FormatError(f"{self.name}: the file ends inside its header (truncated)")
            header = memoryview(blob)[: pre.header_nbytes]
            self.layout = native.parse_header(header, pre, raw, self.name, verify)
            if any(blob[pre.header_nbytes :]):
                raise FormatError(f"{self.name}: nonzero padding after the header")
            self.header_end = header_end
            self.version = f"{pre.major}.{pre.minor}"
            self.header_nbytes = pre.header_nbytes
        except BaseException:
            self.src.close()
            raise
        self._keys: dict[str, int] | None = None
        self.ambiguous: set[str] = set()

    # Key paths -----------------------------------------------------------------
    def key_index(self) -> dict[str, int]:
        if self._keys is None:
            with no_gc():
                self._keys, self.ambiguous = key_index(self.layout.tree)
        return self._keys

    def storage_keys(self, s: int) -> list[str]:
        by_tensor: dict[int, str] = {}
        for path, i in self.key_index().items():
            by_tensor.setdefault(i, path)
        return [by_tensor.get(i, f"tensor {i}") for i in self.layout.storage_tensors[s]]

    # Storages ------------------------------------------------------------------
    def read_storages(
        self, which: list[int] | None, map_location: Any, verify: bool, threads: int, use_mmap: bool
    ) -> dict[int, Any]:
        """Reads storages (all when `which` is None) into fresh memory, checks them, and
        returns {storage index: torch UntypedStorage or numpy uint8 array}; reading them
        all onto the CPU, a _Prebuilt dict where some values are their one tensor."""
        lay = self.layout
        idx = list(range(len(lay.storage_kind))) if which is None else which
        if use_mmap:
            raw = self._map_storages(idx, verify, threads, check_gaps=which is None)
        elif self.src.fd is not None:
            direct = self._cuda_targets(idx, map_location)
            if direct:
                return self._read_to_cuda(idx, direct, map_location, verify, threads, which is None)
            prebuild = which is None and not self.pin_memory and self._stays_on_cpu(map_location)
            raw = self._pread_storages(idx, verify, threads, which is None, prebuild)
            if prebuild:
                return raw  # every storage's place is where it was read
        else:
            raw = self._stream_storages(idx, verify, threads, whole=which is None)
        place = _placer(self, map_location)
        return {s: place(s, raw[s]) for s in idx}

    def _cuda_targets(self, idx: list[int], map_location: Any) -> dict[int, Any]:
        """The storages that go straight from the file to CUDA memory (see _cuda)."""
        lay = self.layout
        if not any(lay.storage_kind[s] == "torch" for s in idx):
            return {}
        torch = _torch_for(self)
        targets = _cuda.target_devices(
            torch, lay.storage_device, lay.storage_kind, idx, map_location
        )
        for dev in {str(d) for d in targets.values()}:
            _check_device(self, torch, dev)
        return targets

    def _read_to_cuda(
        self,
        idx: list[int],
        direct: dict[int, Any],
        map_location: Any,
        verify: bool,
        threads: int,
        whole: bool,
    ) -> dict[int, Any]:
        lay = self.layout
        assert self.src.fd is not None
        zeros: list[tuple[int, int]] = []
        checksum = verify and self.crc_kind != "none"
        if whole and self.canonical_gaps:
            begin = int(lay.storage_offsets[0]) if len(lay.storage_offsets) else lay.file_nbytes
            zeros = _cuda.zero_ranges(
                lay.storage_offsets, lay.storage_nbytes, begin, lay.file_nbytes
            )
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.src.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        out, order, crcs = _cuda.read_storages(
            _torch_for(self),
            self.src.fd,
            self.name,
            direct,
            lay.storage_offsets,
            lay.storage_nbytes,
            checksum,
            threads,
            zeros,
            zip_crc=self.crc_kind == "crc32",
        )
        if checksum and order:
            self._check_crcs(order, crcs)
        rest = [s for s in idx if s not in direct]
        if rest:  # numpy arrays, CPU tensors: the padding was checked above
            raw = self._pread_storages(rest, verify, threads, check_gaps=False)
            place = _placer(self, map_location)
            out.update({s: place(s, raw[s]) for s in rest})
        return out

    def _stays_on_cpu(self, map_location: Any) -> bool:
        """True when map_location leaves every torch storage on the CPU as read (no
        copy, no callable), so tensors may be allocated before the read."""
        lay = self.layout
        if map_location is None:
            return all(d == "cpu" for d in set(lay.storage_device))
        torch = sys.modules.get("torch")
        if isinstance(map_location, str) or (
            torch is not None and isinstance(map_location, torch.device)
        ):
            return str(map_location) == "cpu"
        return False

    def _prebuilt_rows(self, idx: list[int]) -> dict[int, int]:
        """{storage: its one tensor row} for the torch storages whose single tensor
        starts at byte 0 and spans the whole storage: those tensors are allocated
        directly with their shape and strides (one call instead of a storage, an empty
        tensor and set_), and the read lands in them. Bool rows are left out: their
        bytes are checked on the storage."""
        lay = self.layout
        rows = lay.tensors
        nbytes = lay.storage_nbytes.tolist()
        out: dict[int, int] = {}
        for s in idx:
            members = lay.storage_tensors[s]
            if len(members) == 1 and lay.storage_kind[s] == "torch":
                row = rows[members[0]]
                if row[5] == 0 and row[2] in _PREBUILT_DTYPES:
                    # The read fills the whole storage, so the tensor's own allocation
                    # (what empty_strided sizes from shape and strides) must be exactly
                    # that big: a storage larger than its one view (torch.save keeps
                    # whole storages) keeps the ordinary path.
                    shape, strides = row[3], row[4]
                    if 0 in shape:
                        need = 0
                    else:
                        need = 1
                        for d, st in zip(shape, strides):
                            need += (d - 1) * st
                        need *= TORCH_ITEMSIZE[row[2]]
                    if need == nbytes[s]:
                        out[s] = members[0]
        return out

    def _allocate(
        self, idx: list[int], prebuild: bool = False
    ) -> tuple[dict[int, Any], np.ndarray]:
        lay = self.layout
        torch = _torch_for(self) if any(lay.storage_kind[s] == "torch" for s in idx) else None
        bufs: dict[int, Any] = {}
        ptrs = np.zeros(len(idx), dtype=np.uint64)
        single = self._prebuilt_rows(idx) if prebuild else {}
        if single:
            assert torch is not None
            bufs = _Prebuilt()
            bufs.prebuilt = set(single)
            empty_strided = torch.empty_strided
            rows = lay.tensors
            for j, s in enumerate(idx):
                i = single.get(s)
                if i is None:
                    continue
                _, _, dtype, shape, strides, _, _ = rows[i]
                dt = _TORCH_DTYPES.get(dtype)
                if dt is None:
                    dt = _TORCH_DTYPES[dtype] = getattr(torch, dtype)
                t = bufs[s] = empty_strided(shape, strides, dtype=dt)
                ptrs[j] = t.data_ptr()
        for j, s in enumerate(idx):
            if s in bufs:
                continue
            nb = int(lay.storage_nbytes[s])
            if lay.storage_kind[s] == "torch":
                assert torch is not None
                if self.pin_memory:
                    st = torch.empty(nb, dtype=torch.uint8, pin_memory=True).untyped_storage()
                else:
                    st = torch.UntypedStorage(nb)
                bufs[s] = st
                ptrs[j] = st.data_ptr()
            else:
                a = np.empty(nb, dtype=np.uint8)
                bufs[s] = a
                ptrs[j] = a.ctypes.data
        return bufs, ptrs

    def _check_crcs(self, idx: list[int], got: np.ndarray) -> None:
        want = self.layout.storage_crcs[idx]
        bad = np.nonzero(got != want)[0]
        if self.crc_kind == "crc32":
            bad = bad[want[bad] != 0]  # torch.save writes 0 when told not to compute CRCs
        if len(bad):
            s = idx[int(bad[0])]
            keys = ", ".join(self.storage_keys(s)[:4])
            what = "zip CRC-32 checksum" if self.crc_kind == "crc32" else "checksum"
            raise ChecksumError(
                f"{self.name}: storage {s} ({keys}) {what} mismatch (file damaged after it was written); "
                "re-save it, or pass verify=False to read anyway"
            )

    def _pread_storages(
        self, idx: list[int], verify: bool, threads: int, check_gaps: bool, prebuild: bool = False
    ) -> dict[int, Any]:
        """Reads storages into fresh memory; with `prebuild`, some values are already
        the storage's one tensor (see _prebuilt_rows) rather than a storage."""
        lay = self.layout
        bufs, ptrs = self._allocate(idx, prebuild)
        assert self.src.fd is not None
        nbytes = lay.storage_nbytes[idx]
        full = nbytes > 0  # empty storages have no bytes and no padding: no I/O
        crcs = np.zeros(len(idx), dtype=np.uint32)
        if check_gaps and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(
                self.src.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL
            )  # a whole file: larger readahead
        crcs[full] = _engine.read_regions(
            self.src.fd,
            ptrs[full],
            nbytes[full],
            lay.storage_offsets[idx][full],
            threads,
            _config.task_nbytes(),
            verify and self.crc_kind != "none",
            check_gaps and self.canonical_gaps,
            int(lay.storage_offsets[0]) if len(lay.storage_offsets) else lay.file_nbytes,
            lay.file_nbytes,
            self.name,
            _config.hugepages(),
            self.crc_kind == "crc32",
        )
        if verify:
            self._verify(idx, ptrs, threads, crcs)
        return bufs

    def _verify(
        self, idx: list[int], ptrs: np.ndarray, threads: int, crcs: np.ndarray | None
    ) -> None:
        """Checks the stored checksums of storages `idx` now in memory at `ptrs`; `crcs`
        are the CRC32Cs the engine computed while reading, if it did."""
        if self.crc_kind == "none":
            return
        if crcs is None:
            crcs = _engine.checksum_regions(
                ptrs,
                self.layout.storage_nbytes[idx],
                threads,
                _config.task_nbytes(),
                self.crc_kind == "crc32",
            )
        self._check_crcs(idx, crcs)

    def _stream_storages(
        self, idx: list[int], verify: bool, threads: int, whole: bool
    ) -> dict[int, Any]:
        lay = self.layout
        bufs, ptrs = self._allocate(idx)
        pad_check = whole and self.canonical_gaps
        cursor = min(native.data_start(lay.header_end - native.PREAMBLE_NBYTES), lay.file_nbytes)
        for j, s in enumerate(idx):
            off = int(lay.storage_offsets[s])
            nb = int(lay.storage_nbytes[s])
            if nb == 0:
                continue
            if off > cursor and pad_check:
                pad = self.src.read(off - cursor, cursor)
                if len(pad) != off - cursor:
                    raise FormatError(
                        f"{self.name}: unexpected end of file at offset {cursor} (truncated)"
                    )
                if any(pad):
                    raise FormatError(f"{self.name}: nonzero padding before storage {s}")
            if self.src.readinto(_raw_view(int(ptrs[j]), nb), off) != nb:
                raise FormatError(f"{self.name}: unexpected end of file in storage {s} (truncated)")
            cursor = off + nb
        if whole and not self.src.seekable and self.src.read(1, self.src.consumed):
            raise FormatError(f"{self.name}: trailing bytes after the last storage")
        if verify:
            self._verify(idx, ptrs, threads, None)
        return bufs

    def _map_storages(
        self, idx: list[int], verify: bool, threads: int, check_gaps: bool
    ) -> dict[int, Any]:
        lay = self.layout
        if self.src.fd is None:
            raise ValueError("tensorfile.load: mmap=True needs a path, not a stream")
        mm = _mmap.mmap(self.src.fd, 0, access=_mmap.ACCESS_COPY)
        whole = np.frombuffer(mm, dtype=np.uint8)
        if check_gaps and self.canonical_gaps:
            cursor = int(lay.storage_offsets[0]) if len(idx) else lay.file_nbytes
            for s in range(len(lay.storage_kind)):
                off = int(lay.storage_offsets[s])
                if off > cursor and whole[cursor:off].any():
                    raise FormatError(f"{self.name}: nonzero padding before storage {s}")
                cursor = max(cursor, off + int(lay.storage_nbytes[s]))
        if verify and idx:
            base = whole.ctypes.data
            self._verify(idx, lay.storage_offsets[idx] + np.uint64(base), threads, None)
        out: dict[int, Any] = {}
        torch = _torch_for(self) if any(lay.storage_kind[s] == "torch" for s in idx) else None
        mapped = None
        if torch is not None and len(whole):
            mapped = torch.frombuffer(mm, dtype=torch.uint8).untyped_storage()
        for s in idx:
            off = int(lay.storage_offsets[s])
            nb = int(lay.storage_nbytes[s])
            if lay.storage_kind[s] == "torch":
                assert torch is not None
                # Each storage is a slice of one storage over the whole mapping, which it
                # keeps alive: no buffer export and no tensor per storage (for 20,000
                # storages, a uint8 tensor each was some 10 MiB of peak RSS).
                out[s] = (
                    mapped[off : off + nb] if nb and mapped is not None else torch.UntypedStorage(0)
                )
            else:
                out[s] = whole[off : off + nb]
        return out

    # Objects -------------------------------------------------------------------
    def build_tensor(
        self,
        i: int,
        storages: dict[int, Any],
        cache: dict[int, Any] | None = None,
        row: list[Any] | None = None,
    ) -> Any:
        """Tensor row i over its storage (`row`: that row, when the caller has it)."""
        if cache is not None and i in cache:
            return cache[i]
        kind, s, dtype, shape, strides, off, flags = self.layout.tensors[i] if row is None else row
        if kind == "numpy":
            buf = storages[s]
            out = np.ndarray(
                tuple(shape), dtype=np.dtype(dtype), buffer=buf, offset=off, strides=tuple(strides)
            )
            if dtype == "bool":
                _check_bool(self.name, out.view(np.uint8), i)
        else:
            torch = _torch_for(self)
            storage = storages[s]
            if s in getattr(storages, "prebuilt", ()):
                out = storage  # allocated with its shape before the read (_prebuilt_rows)
            else:
                dt = _TORCH_DTYPES.get(dtype)
                if dt is None:
                    dt = _TORCH_DTYPES[dtype] = getattr(torch, dtype)
                itemsize = dt.itemsize
                out = torch.empty(0, dtype=dt, device=storage.device).set_(
                    storage, off // itemsize, shape, strides
                )
            if dtype == "bool":
                raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
                    storage, off, shape, strides
                )
                if bool((raw > 1).any()):
                    raise FormatError(
                        f"{self.name}: bool tensor {i} holds bytes other than 0 and 1"
                    )
            if flags & native.FLAG_PARAMETER:
                out = torch.nn.Parameter(out, requires_grad=bool(flags & native.FLAG_REQUIRES_GRAD))
            elif flags & native.FLAG_REQUIRES_GRAD:
                out.requires_grad_(True)
        if cache is not None:
            cache[i] = out
        return out

    def build(self, storages: dict[int, Any]) -> Any:
        # Every row is referenced by the tree (the header guarantees it): build them all
        # in one pass, taking tensors allocated before the read as they are.
        tensors: list[Any] = []
        append = tensors.append
        prebuilt = getattr(storages, "prebuilt", ())
        for i, row in enumerate(self.layout.tensors):
            if row[6] == 0 and row[1] in prebuilt:
                append(storages[row[1]])
            else:
                append(self.build_tensor(i, storages, row=row))
        return Builder(lambda tag, i: tensors[i], tensors).build(self.layout.tree)

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SafetensorsReader(_Reader):
    """A safetensors file, strictly validated; each tensor is a storage of its own."""

    format = "safetensors"
    crc_kind = "none"
    canonical_gaps = False

    def __init__(self, src: Source, raw: bytes, verify: bool = True) -> None:
        self.src = src
        self.name = src.name
        self.version = ""

        def read(nbytes: int, offset: int) -> bytes:
            # the first bytes were read already (a pipe cannot give them again)
            if offset + nbytes <= len(raw):
                return raw[offset : offset + nbytes]
            if offset < len(raw):
                return raw[offset:] + src.read(offset + nbytes - len(raw), len(raw))
            return src.read(nbytes, offset)

        self.layout = safetensors.parse(raw, read, src.nbytes, self.name)
        self.header_nbytes = self.layout.header_end - 8
        if sys.modules.get("torch") is None:
            try:
                import torch  # noqa: F401
            except ImportError:
                self._as_numpy()
        self._keys: dict[str, int] | None = None
        self.ambiguous: set[str] = set()

    def _as_numpy(self) -> None:
        lay = self.layout
        for row in lay.tensors:
            if not safetensors.numpy_supported(row[2]):
                raise ImportError(f"{self.name} holds {row[2]} tensors: install torch to load it")
            itemsize = np.dtype(row[2]).itemsize
            row[0] = "numpy"
            row[4] = [s * itemsize for s in row[4]]
        lay.storage_kind = ["numpy"] * len(lay.storage_kind)


class _TorchZipReader(_Reader):
    """A torch.save zip file: the pickle read by a restricted unpickler into tensor
    records, storages read like any other, each checked against its zip CRC-32."""

    format = "torch.save"
    crc_kind = "crc32"
    canonical_gaps = False

    def __init__(self, src: Source, raw: bytes, verify: bool = True) -> None:
        self.src = src
        self.name = src.name
        if not src.seekable or src.nbytes is None:
            raise ValueError(
                f"{self.name}: a torch.save zip file is read from its end; pass a path or a seekable stream"
            )
        torch = _torch_for(self)
        arch = torchzip.open_archive(src.read, src.nbytes, torch, self.name, self._read_many)
        self.layout = torchzip.layout(arch, torch, self.name, src.nbytes)
        self.archive = arch
        self.version = arch.version
        self.header_nbytes = arch.pickle_nbytes
        self._keys: dict[str, int] | None = None
        self.ambiguous: set[str] = set()

    def _read_many(self, offsets: list[int], sizes: list[int]) -> bytes:
        """Sorted, disjoint small ranges in one engine call (a few gathered preads)."""
        if not sizes:
            return b""
        if self.src.fd is None:
            return b"".join(self.src.read(n, o) for o, n in zip(offsets, sizes))
        nbytes = np.array(sizes, dtype=np.uint64)
        buf = np.zeros(int(nbytes.sum()), dtype=np.uint8)
        ptrs = np.concatenate(([0], np.cumsum(nbytes)[:-1])).astype(np.uint64) + np.uint64(
            buf.ctypes.data
        )
        _engine.read_regions(
            self.src.fd,
            ptrs,
            nbytes,
            np.array(offsets, dtype=np.uint64),
            1,
            _config.task_nbytes(),
            False,
            False,
            0,
            0,
            self.name,
        )
        return buf.tobytes()

    def key_index(self) -> dict[str, int]:
        if self._keys is None:
            keys: dict[str, int] = {}

            def visit(path: str, rec: torchzip.TensorRecord) -> None:
                if keys.setdefault(path, rec.index) != rec.index:
                    self.ambiguous.add(path)

            torchzip.walk_records(self.archive.root, visit)
            self._keys = keys
        return self._keys

    def build_tensor(
        self,
        i: int,
        storages: dict[int, Any],
        cache: dict[int, Any] | None = None,
        row: list[Any] | None = None,
    ) -> Any:
        fresh = cache is None or i not in cache
        out = super().build_tensor(i, storages, cache, row)
        meta = self.archive.records[i].meta
        if meta and fresh:
            _torch_for(self)._utils.set_tensor_metadata(out, meta)
        return out

    def build(self, storages: dict[int, Any]) -> Any:
        cache: dict[int, Any] = {}
        tensors = [self.build_tensor(i, storages, cache) for i in range(len(self.layout.tensors))]
        return torchzip.substitute(self.archive.root, tensors)


class _Prebuilt(dict[int, Any]):
    """{storage index: storage}, where the storages in `prebuilt` are instead their
    one tensor, allocated with its shape before the read (_Reader._prebuilt_rows)."""

    prebuilt: set[int]


_TORCH_DTYPES: dict[str, Any] = {}
# dtypes that torch.empty_strided allocates (sub-byte and bit types it may not); bool
# is left out because its bytes are checked through a uint8 view of the storage.
_PREBUILT_DTYPES = frozenset(
    "float16 bfloat16 float32 float64 complex64 complex128 uint8 int8 int16 int32 int64".split()
)


def _check_bool(name: str, raw: np.ndarray, i: int) -> None:
    if raw.size and int(raw.max()) > 1:
        raise FormatError(f"{name}: bool tensor {i} holds bytes other than 0 and 1")


def _torch_for(reader: _Reader) -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{reader.name} holds torch tensors: install torch to load it"
            ) from None
    return torch


def _placer(reader: _Reader, map_location: Any) -> Any:
    """Returns place(s, host storage) -> the storage the tensors will view, on the device
    that map_location picks for storage s, with torch.load's semantics: None keeps the
    saved device, a string or torch.device sends everything there, a dict remaps saved
    device strings, and a callable(storage, location) returns the storage to use (None
    for the default)."""
    lay = reader.layout
    torch = sys.modules.get("torch")
    targets: dict[str, str] = {}

    def target_of(saved: str) -> str:
        t = targets.get(saved)
        if t is None:
            where = _cuda.mapped_location(saved, map_location)
            t = targets[saved] = str(_torch_for(reader).device(where))
        return t

    is_callable = callable(map_location) and not isinstance(map_location, (str, dict))
    if torch is not None and isinstance(map_location, torch.device):
        is_callable = False

    def place(s: int, buf: Any) -> Any:
        if lay.storage_kind[s] == "numpy":
            return buf
        saved = lay.storage_device[s]
        if is_callable:
            result = map_location(buf, saved)
            if result is None:
                return _to_device(reader, buf, saved)
            tm = _torch_for(reader)
            if isinstance(result, tm.TypedStorage):
                result = result.untyped()
            if not isinstance(result, tm.UntypedStorage):
                raise TypeError(
                    f"map_location callable returned {type(result).__name__}, expected a storage"
                )
            return result
        target = target_of(saved)
        return buf if target == "cpu" else _to_device(reader, buf, target)

    return place


def _to_device(reader: _Reader, storage: Any, target: str) -> Any:
    torch = _torch_for(reader)
    dev = torch.device(target)
    if dev.type == "cpu":
        return storage
    _check_device(reader, torch, target)
    return storage.to(device=dev)


def _check_device(reader: _Reader, torch: Any, target: str) -> None:
    """Raises torch.load's errors for a CUDA device that is missing here."""
    dev = torch.device(target)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{reader.name}: a storage is meant for {target} but CUDA is not available here; "
                "pass map_location='cpu' (or a dict or callable) to load it on the CPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{reader.name}: a storage is meant for {target} but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; pass map_location to put it elsewhere"
            )


def load(
    f: FileLike,
    map_location: Any = None,
    *,
    mmap: bool = False,
    verify: bool = True,
    num_threads: int | None = None,
    pin_memory: bool = False,
) -> Any:
    """Loads what `save` wrote: the same containers, tensors, sharing and plain values.

    `map_location` works as in torch.load (None, a device string, a torch.device, a dict
    remapping saved devices, or a callable(storage, location)). Storages bound for CUDA
    are read from the file straight into device memory through pinned staging buffers
    (or GPUDirect Storage, see TENSORFILE_GDS); a callable receives CPU storages, as in
    torch.load. `mmap=True` returns tensors backed by a private copy-on-write mapping of
    the file. `pin_memory=True` puts CPU tensors in pinned (page-locked) memory, ready
    for fast copies to CUDA; it needs CUDA. `verify=False` skips the checksums, never
    the structural checks. Raises FormatError (ChecksumError for damaged bytes) naming
    the file; no code in the file is ever executed. Releases the GIL while bytes move.
    """
    if pin_memory:
        if mmap:
            raise ValueError("tensorfile.load: pin_memory=True cannot be combined with mmap=True")
        if not _cuda.cuda_available():
            raise RuntimeError(
                "tensorfile.load: pin_memory=True needs CUDA, which is not available here"
            )
    with no_gc():
        reader = _open_reader(f, verify)
        reader.pin_memory = pin_memory
        try:
            storages = reader.read_storages(
                None, map_location, verify, _config.num_threads(num_threads), mmap
            )
            out = reader.build(storages)
        finally:
            reader.close()
        # Free the header's many small objects while the collector is still paused:
        # alive at gc.enable(), they would make its next pass walk them all.
        del reader, storages
        return out


class TensorFile:
    """A lazily read file: `keys()`, `get(key)`, `metadata()`, `load()`; reads only the
    bytes asked for. Use as a context manager, or call close()."""

    def __init__(self, f: FileLike, *, verify: bool = True) -> None:
        with no_gc():
            self._reader = _open_reader(f, verify)
        self._verify = verify

    def keys(self) -> list[str]:
        """Key paths of the tensors, such as "model.0.weight", in the order saved."""
        return list(self._reader.key_index())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._reader.key_index()

    def __len__(self) -> int:
        return len(self._reader.key_index())

    def get(self, key: str, map_location: Any = None) -> Any:
        """Reads one tensor (and only the storage it views)."""
        index = self._reader.key_index().get(key)
        if index is None:
            raise KeyError(f"{self._reader.name}: no tensor at key path {key!r}")
        if key in self._reader.ambiguous:
            raise KeyError(
                f"{self._reader.name}: key path {key!r} names more than one tensor "
                "(dict keys containing '.' collide with nesting); use load() instead"
            )
        s = self._reader.layout.tensors[index][1]
        storages = self._reader.read_storages(
            [s], map_location, self._verify, _config.num_threads(), False
        )
        return self._reader.build_tensor(index, storages)

    @property
    def format(self) -> str:
        """What the file is: "tensorfile", "torch.save" or "safetensors"."""
        return self._reader.format

    def metadata(self) -> dict[str, str]:
        """The str -> str metadata saved with the file (safetensors' __metadata__; empty for torch.save)."""
        return dict(self._reader.layout.metadata)

    def load(self, map_location: Any = None, *, num_threads: int | None = None) -> Any:
        with no_gc():
            storages = self._reader.read_storages(
                None, map_location, self._verify, _config.num_threads(num_threads), False
            )
            return self._reader.build(storages)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(f: FileLike, *, verify: bool = True) -> TensorFile:
    """Opens a file for lazy reading; see TensorFile."""
    return TensorFile(f, verify=verify)
