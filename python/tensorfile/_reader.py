"""One reader over a file's layout, whatever its format: opens the file with the parser
its first bytes call for, names its tensors by key path, reads storages through _io and
rebuilds tensors and the object graph."""

from __future__ import annotations

import os
import sys
from typing import Any

from . import _io, _numpy, _torch
from ._errors import FormatError
from ._files import FileLike
from ._tree import Builder, key_index, no_gc
from .formats import Layout, TensorRow, native, safetensors, sniff, torchzip


def open_reader(
    f: FileLike | _io.Source,
    verify: bool = True,
    *,
    holders: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Reader:
    """Opens `f` (a path, a binary stream or an opened source) with the parser its first
    bytes call for: a tensorfile, a torch.save zip or a safetensors file (the file's name
    plays no part). `holders=False` leaves the files its referenced storages lie in
    unopened (a holder is read only for the storages it holds itself)."""
    src = f if isinstance(f, _io.Source) else _io.Source(f, storage_options=storage_options)
    try:
        head = src.read(native.PREAMBLE_NBYTES, 0)
        kind = sniff(head)
        if kind == "torch.save":
            return Reader(src, _torch_layout(src))
        if kind == "safetensors":
            return Reader(src, _safetensors_layout(src, head))
        if kind == "pickle":
            raise FormatError(
                f"{src.name}: this looks like a pickle: a legacy (before PyTorch 1.6) torch.save "
                "file or a plain pickle, which tensorfile does not load; re-save it with a current torch.save"
            )
        layout, pad = native.read_layout(src.read, src.nbytes, head, src.name, verify)
        _io.check_padding(src.name, pad, layout.header_end)
        reader = Reader(src, layout)
        if layout.storage_refs and holders:
            _open_holders(reader, verify)
        return reader
    except BaseException:
        src.close()
        raise


def _open_holders(reader: Reader, verify: bool) -> None:
    """Opens the files that hold the bytes of `reader`'s referenced storages (format 1.1,
    written by incremental checkpoints): tensorfiles in the same directory, opened without
    following links, whose storage must have the same size, checksum and kind and hold
    its bytes itself."""
    name, lay = reader.name, reader.layout
    if reader.src.fd is None:
        raise FormatError(
            f"{name}: its storages refer to other files of its directory; open it by path"
        )
    directory = os.path.dirname(os.path.abspath(name))
    try:
        for s, (file, j) in sorted(lay.storage_refs.items()):
            holder = reader.holders.get(file)
            if holder is None:
                try:
                    src = _io.Source(os.path.join(directory, file), nofollow=True)
                except FileNotFoundError:
                    raise FormatError(
                        f"{name}: storage {s} refers to {file}, which is missing "
                        "(a checkpoint it depends on was removed)"
                    ) from None
                holder = reader.holders[file] = open_reader(src, verify, holders=False)
            why = _holder_mismatch(holder, j, lay, s)
            if why:
                raise FormatError(f"{name}: storage {s} refers to storage {j} of {file}, {why}")
    except BaseException:
        reader.close()
        raise


def _holder_mismatch(holder: Reader, j: int, lay: Layout, s: int) -> str | None:
    h = holder.layout
    if holder.format != "tensorfile":
        return f"which is a {holder.format} file, not a tensorfile"
    if j >= len(h.storage_kind):
        return f"but that file has {len(h.storage_kind)} storages"
    if j in h.storage_refs:
        return "which is itself a reference (references must name the file holding the bytes)"
    if int(h.storage_nbytes[j]) != int(lay.storage_nbytes[s]):
        return f"which holds {int(h.storage_nbytes[j])} bytes, not {int(lay.storage_nbytes[s])}"
    if int(h.storage_crcs[j]) != int(lay.storage_crcs[s]):
        return "whose checksum differs (a different file under that name)"
    if h.storage_kind[j] != lay.storage_kind[s]:
        return f"which holds {h.storage_kind[j]} tensors, not {lay.storage_kind[s]}"
    return None


def _torch_layout(src: _io.Source) -> Layout:
    if not src.seekable or src.nbytes is None:
        raise ValueError(
            f"{src.name}: a torch.save zip file is read from its end; pass a path or a seekable stream"
        )
    torch = _torch.module(src.name)

    def gather(offsets: list[int], sizes: list[int]) -> bytes:
        return _io.gather(src, src.name, offsets, sizes)

    archive = torchzip.open_archive(src.read, src.nbytes, torch, src.name, gather)
    return torchzip.layout(archive, torch, src.name, src.nbytes)


def _safetensors_layout(src: _io.Source, head: bytes) -> Layout:
    def read(nbytes: int, offset: int) -> bytes:
        # the first bytes were read already (a pipe cannot give them again)
        if offset + nbytes <= len(head):
            return head[offset : offset + nbytes]
        if offset < len(head):
            return head[offset:] + src.read(offset + nbytes - len(head), len(head))
        return src.read(nbytes, offset)

    as_numpy = False
    if sys.modules.get("torch") is None:
        try:
            import torch  # noqa: F401
        except ImportError:
            as_numpy = True
    return safetensors.parse(head, read, src.nbytes, src.name, as_numpy)


class Reader:
    """An open, validated file: the layout is trusted, storages are read on demand."""

    pin_memory = False  # CPU torch storages in pinned memory (load(pin_memory=True))

    def __init__(self, src: _io.Source, layout: Layout) -> None:
        self.src = src
        self.layout = layout
        self.name = src.name
        self._keys: dict[str, int] | None = None
        self.ambiguous: set[str] = set()
        self.holders: dict[str, Reader] = {}  # the files referenced storages are read from

    @property
    def format(self) -> str:
        return self.layout.format

    @property
    def version(self) -> str:
        return self.layout.version

    @property
    def header_nbytes(self) -> int:
        return self.layout.header_nbytes

    # Key paths -----------------------------------------------------------------
    def key_index(self) -> dict[str, int]:
        """{key path: tensor row} of every reference to a tensor; `ambiguous` holds the
        paths that name more than one tensor."""
        if self._keys is None:
            archive = self.layout.archive
            if archive is None:
                with no_gc():
                    self._keys, self.ambiguous = key_index(self.layout.tree)
            else:
                keys: dict[str, int] = {}

                def visit(path: str, rec: torchzip.TensorRecord) -> None:
                    if keys.setdefault(path, rec.index) != rec.index:
                        self.ambiguous.add(path)

                torchzip.walk_records(archive.root, visit)
                self._keys = keys
        return self._keys

    def storage_keys(self, s: int) -> list[str]:
        by_tensor: dict[int, str] = {}
        for path, i in self.key_index().items():
            by_tensor.setdefault(i, path)
        return [by_tensor.get(i, f"tensor {i}") for i in self.layout.storage_tensors[s]]

    # Destinations (in-place loads) ----------------------------------------------
    def destinations(self, targets: dict[str, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """Matches `targets` ({key path: torch tensor}) to the file's tensors. Returns
        ({tensor row: destination}, {storage: destination read straight into}): a storage
        is read straight into its destination's memory when it holds just that one tensor,
        whole and contiguous, and the destination is contiguous with the same strides;
        other destinations are copied into after the read. Raises ValueError naming every
        key path whose dtype or shape differs (before anything is read)."""
        keys = self.key_index()
        rows = self.layout.tensors
        by_row: dict[int, Any] = {}
        wrong: list[str] = []
        for path, t in targets.items():
            i = keys.get(path)
            if i is None:
                continue
            if path in self.ambiguous:
                wrong.append(f"{path!r} names more than one tensor in the file")
                continue
            row = rows[i]
            want = _torch.dtype_info(t.dtype)
            if row.kind != "torch":
                wrong.append(f"{path!r} is a numpy array in the file")
            elif want is None or want[0] != row.dtype or list(t.shape) != list(row.shape):
                wrong.append(
                    f"{path!r}: the file has {row.dtype} {list(row.shape)}, the destination "
                    f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
                )
            else:
                by_row[i] = t
        if wrong:
            shown = "; ".join(wrong[:20]) + ("; ..." if len(wrong) > 20 else "")
            raise ValueError(
                f"{self.name}: {len(wrong)} tensor(s) do not fit their destination: {shown}"
            )
        direct: dict[int, Any] = {}
        used: set[int] = set()
        nbytes = self.layout.storage_nbytes
        for i, t in by_row.items():
            row = rows[i]
            s = row.storage
            members = self.layout.storage_tensors[s]
            ptr = t.data_ptr()
            if (
                len(members) == 1
                and row.offset == 0
                and t.numel() * t.element_size() == int(nbytes[s])
                and list(t.stride()) == list(row.strides)
                and t.is_contiguous()
                and not (t.is_conj() or t.is_neg())
                and (t.is_cpu or t.is_cuda)
                and ptr not in used
            ):
                direct[s] = t
                if ptr:
                    used.add(ptr)
        return by_row, direct

    # Storages and objects ------------------------------------------------------
    def read_storages(
        self,
        which: list[int] | None,
        map_location: Any,
        verify: bool,
        threads: int,
        use_mmap: bool,
        into: dict[int, Any] | None = None,
    ) -> dict[int, Any]:
        """Storages `which` (all when None), read and checked; see _io.read_storages.
        Referenced storages are read from the files holding them, each file's share in
        one call, as if they were that file's own."""
        refs = self.layout.storage_refs
        if not refs:
            return _io.read_storages(self, which, map_location, verify, threads, use_mmap, into)
        idx = range(len(self.layout.storage_kind)) if which is None else which
        into = into or {}
        local = [s for s in idx if s not in refs]
        out = _io.read_storages(
            self,
            local,
            map_location,
            verify,
            threads,
            use_mmap,
            {s: t for s, t in into.items() if s not in refs},
            whole=which is None,
        )
        by_file: dict[str, list[int]] = {}
        for s in idx:
            if s in refs:
                by_file.setdefault(refs[s][0], []).append(s)
        for file, ours in by_file.items():
            holder = self.holders[file]
            while ours:  # in rounds: two storages with the same bytes still load as two
                batch: dict[int, int] = {}
                rest = []
                for s in ours:
                    j = refs[s][1]
                    if j in batch:
                        rest.append(s)
                    else:
                        batch[j] = s
                        holder.layout.storage_device[j] = self.layout.storage_device[s]
                got = _io.read_storages(
                    holder,
                    list(batch),
                    map_location,
                    verify,
                    threads,
                    use_mmap,
                    {j: into[s] for j, s in batch.items() if s in into},
                )
                out.update({s: got[j] for j, s in batch.items()})
                ours = rest
        return out

    def byte_source(self, s: int) -> tuple[int, int]:
        """(descriptor, absolute offset) of storage s's bytes, in this file or in the file
        holding a referenced storage; the descriptor is -1 for an object (read by URL)."""
        ref = self.layout.storage_refs.get(s)
        reader, j = (self, s) if ref is None else (self.holders[ref[0]], ref[1])
        fd = -1 if reader.src.fd is None else reader.src.fd
        return fd, int(reader.layout.storage_offsets[j])

    def build_tensor(
        self,
        i: int,
        storages: dict[int, Any],
        cache: dict[int, Any] | None = None,
        row: TensorRow | None = None,
    ) -> Any:
        """Tensor row i over its storage (`row`: that row, when the caller has it)."""
        if cache is not None and i in cache:
            return cache[i]
        if row is None:
            row = self.layout.tensors[i]
        storage = storages[row.storage]
        if row.kind == "numpy":
            out = _numpy.view(row, storage)
            if row.dtype == "bool":
                _io.check_bool_bytes(self.name, i, out.view("uint8"))
        else:
            torch = _torch.module(self.name)
            if row.storage in getattr(storages, "prebuilt", ()):
                # allocated with its shape before the read
                out = _torch.with_flags(torch, storage, row.flags)
            else:
                if row.dtype == "bool":
                    _io.check_bool_bytes(self.name, i, _torch.raw_bytes(torch, row, storage))
                out = _torch.view(torch, row, storage)
            archive = self.layout.archive
            if archive is not None and archive.records[i].meta:
                torch._utils.set_tensor_metadata(out, archive.records[i].meta)
        if cache is not None:
            cache[i] = out
        return out

    def fill(self, storages: dict[int, Any], dests: dict[int, Any], direct: Any) -> dict[int, Any]:
        """Copies into the destinations of `dests` ({row: tensor}) whose storage was not
        read straight into them (`direct`), once per destination; returns {row: tensor}."""
        torch = _torch.module(self.name)
        cache: dict[int, Any] = {}
        copied: set[int] = set()
        with torch.no_grad():
            for i, t in dests.items():
                if self.layout.tensors[i].storage not in direct and id(t) not in copied:
                    t.copy_(self.build_tensor(i, storages, cache))
                    copied.add(id(t))
                cache[i] = t
        return cache

    def build(
        self,
        storages: dict[int, Any],
        dests: dict[int, Any] | None = None,
        direct: Any = (),
    ) -> Any:
        """The file's object graph over `storages` (all of them); rows in `dests` are
        those destination tensors: filled by the read where their storage is in
        `direct`, copied into here otherwise (once per destination)."""
        archive = self.layout.archive
        cache = self.fill(storages, dests, direct) if dests else {}
        if archive is not None:
            n = len(self.layout.tensors)
            return torchzip.substitute(
                archive.root, [self.build_tensor(i, storages, cache) for i in range(n)]
            )
        # Every row is referenced by the tree (the header guarantees it): build them all
        # in one pass, taking tensors allocated before the read as they are.
        tensors: list[Any] = []
        append = tensors.append
        prebuilt = getattr(storages, "prebuilt", ())
        for i, row in enumerate(self.layout.tensors):
            if i in cache:
                append(cache[i])
            elif row.flags == 0 and row.storage in prebuilt:
                append(storages[row.storage])
            else:
                append(self.build_tensor(i, storages, row=row))
        return Builder(lambda tag, i: tensors[i], tensors).build(self.layout.tree)

    def close(self) -> None:
        for holder in self.holders.values():
            holder.close()
        self.src.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
