"""The public functions: save, load, open, save_safetensors. Argument handling only; the
work is in _io (bytes), _reader (files) and _plan (what a save writes)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

from . import _config, _cuda, _io, _torch
from ._files import FileLike, PathLike
from ._plan import check_metadata, plan_safetensors
from ._reader import Reader, open_reader
from ._tree import Builder, no_gc
from .formats import torchzip


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
        _io.save(obj, f, durable=durable, num_threads=num_threads, metadata=metadata)


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
        plan = plan_safetensors(tensors, check_metadata(metadata), copy_shared)
        _io.write_file(
            os.fspath(path),
            plan.total,
            plan.head,
            plan.regions,
            durable=durable,
            threads=_config.num_threads(num_threads),
        )
        del plan


def load(
    f: FileLike,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    verify: bool = True,
    num_threads: int | None = None,
    pin_memory: bool = False,
    **pickle_load_args: Any,
) -> Any:
    """Loads what `save` wrote: the same containers, tensors, sharing and plain values.

    Takes torch.load's arguments. `map_location` works as in torch.load (None, a device
    string, a torch.device, a dict remapping saved devices, or a callable(storage,
    location)). Storages bound for CUDA are read from the file straight into device
    memory through pinned staging buffers (or GPUDirect Storage, see TENSORFILE_GDS); a
    callable receives CPU storages, as in torch.load. Storages sent to "meta" (a string,
    torch.device("meta") or a dict value) become meta tensors with the saved dtypes,
    shapes, strides and sharing, and none of their bytes are read (so not checked
    either). `mmap=True` returns tensors backed by a private copy-on-write mapping of the
    file (None means False, as in torch.load). The load is always safe: no code in the
    file is ever executed, so `weights_only` (True, False or None) changes nothing, and
    `pickle_module` may only be None (or the standard `pickle`): tensorfile reads
    torch.save pickles with its own restricted unpickler. Of torch.load's
    `**pickle_load_args` only `encoding` is accepted; it affects only strings of Python 2
    pickles, which torch.save zip files never hold. `pin_memory=True` puts CPU tensors in
    pinned (page-locked) memory, ready for fast copies to CUDA; it needs CUDA.
    `verify=False` skips the checksums, never the structural checks. Raises FormatError
    (ChecksumError for damaged bytes) naming the file. Releases the GIL while bytes move.
    """
    use_mmap = _torch_load_args(pickle_module, weights_only, mmap, pickle_load_args)
    if pin_memory:
        if use_mmap:
            raise ValueError("tensorfile.load: pin_memory=True cannot be combined with mmap=True")
        if not _cuda.cuda_available():
            raise RuntimeError(
                "tensorfile.load: pin_memory=True needs CUDA, which is not available here"
            )
    with no_gc():
        reader = open_reader(f, verify)
        reader.pin_memory = pin_memory
        try:
            storages, meta = _read(
                reader, None, map_location, verify, _config.num_threads(num_threads), use_mmap
            )
            out = _build(reader, storages, meta)
        finally:
            reader.close()
        # Free the header's many small objects while the collector is still paused:
        # alive at gc.enable(), they would make its next pass walk them all.
        del reader, storages
        return out


def _torch_load_args(
    pickle_module: Any, weights_only: Any, mmap: Any, pickle_load_args: dict[str, Any]
) -> bool:
    """Checks the torch.load arguments that tensorfile accepts for drop-in use; returns
    whether to map the file. Refuses, with the reason, what would ask it to unpickle."""
    if weights_only not in (None, True, False):
        raise TypeError(
            f"tensorfile.load: weights_only must be True, False or None, got {weights_only!r}"
        )
    if pickle_module is not None and pickle_module is not pickle:
        name = getattr(pickle_module, "__name__", type(pickle_module).__name__)
        raise ValueError(
            f"tensorfile.load: pickle_module={name} is not supported: tensorfile never unpickles "
            "arbitrary objects. torch.save files are read by its own restricted unpickler "
            "(tensors, containers and plain values, as torch.load(weights_only=True)); leave "
            "pickle_module out"
        )
    extra = sorted(k for k in pickle_load_args if k != "encoding")
    if extra:
        raise TypeError(
            f"tensorfile.load: unexpected keyword argument(s) {', '.join(map(repr, extra))}: "
            "torch.load hands these to the unpickler, and tensorfile runs no pickle code to "
            "hand them to (of torch.load's pickle_load_args only encoding= is accepted)"
        )
    encoding = pickle_load_args.get("encoding", "utf-8")
    if not isinstance(encoding, str):
        raise TypeError(f"tensorfile.load: encoding must be a str, got {type(encoding).__name__}")
    if mmap is not None and not isinstance(mmap, bool):
        raise TypeError(f"tensorfile.load: mmap must be True, False or None, got {mmap!r}")
    return bool(mmap)


def _read(
    reader: Reader,
    which: list[int] | None,
    map_location: Any,
    verify: bool,
    threads: int,
    use_mmap: bool,
) -> tuple[dict[int, Any], set[int]]:
    """Storages `which` (all when None) where map_location puts them, and the set of
    those sent to the meta device: those are made there, as torch.load makes them, with
    no byte read; the rest are read and checked by the reader."""
    lay = reader.layout
    kinds, devices = lay.storage_kind, lay.storage_device
    if which is None:
        saved = {d for d, k in zip(devices, kinds) if k == "torch"}
    else:
        saved = {devices[s] for s in which if kinds[s] == "torch"}
    to_meta: set[str] = set()
    if map_location is not None and not _is_callable(map_location):
        _check_devices(reader, saved, map_location)
        to_meta = {
            d for d in saved if _torch.mapped_location(d, map_location).partition(":")[0] == "meta"
        }
    elif saved - {"cpu"}:
        _check_devices(reader, saved, map_location)
    if not to_meta:
        return reader.read_storages(which, map_location, verify, threads, use_mmap), set()
    idx = range(len(kinds)) if which is None else which
    meta = {s for s in idx if kinds[s] == "torch" and devices[s] in to_meta}
    rest = [s for s in idx if s not in meta]
    storages: dict[int, Any] = {}
    if rest:
        storages.update(reader.read_storages(rest, map_location, verify, threads, use_mmap))
    torch = _torch.module(reader.name)
    for s in meta:
        storages[s] = torch.UntypedStorage(int(lay.storage_nbytes[s]), device="meta")
    return storages, meta


def _is_callable(map_location: Any) -> bool:
    # torch.load calls a callable map_location with each storage; devices are not callable
    return callable(map_location) and not isinstance(map_location, dict)


def _check_devices(reader: Reader, saved: set[str], map_location: Any) -> None:
    """Fails before any read if map_location (None: the saved devices) sends torch
    storages to a CUDA device this process cannot use, saying what the caller asked."""
    for where in sorted(saved):
        target = _torch.mapped_location(where, map_location)
        if not target.startswith("cuda"):
            continue
        try:
            _torch.check_device(reader.name, _torch.module(reader.name), target)
        except RuntimeError as e:
            if map_location is None:
                asked = f"it was saved from {where}, and map_location=None keeps the saved device"
            elif isinstance(map_location, dict):
                asked = (
                    f"it was saved from {where}, and map_location={map_location!r} maps it there"
                )
            else:
                asked = f"map_location={map_location!r} sends every storage there"
            raise RuntimeError(f"{e} ({asked})") from None


def _build(reader: Reader, storages: dict[int, Any], meta: set[int]) -> Any:
    """The file's object graph over `storages`; tensors over meta storages are built
    without the bool-byte check, which has no bytes to look at."""
    if not meta:
        return reader.build(storages)
    tensors = [_tensor(reader, i, storages, meta) for i in range(len(reader.layout.tensors))]
    archive = reader.layout.archive
    if archive is not None:
        return torchzip.substitute(archive.root, tensors)
    return Builder(lambda tag, i: tensors[i], tensors).build(reader.layout.tree)


def _tensor(reader: Reader, i: int, storages: dict[int, Any], meta: set[int]) -> Any:
    row = reader.layout.tensors[i]
    if row.storage in meta and row.dtype == "bool":
        return _torch.view(_torch.module(reader.name), row, storages[row.storage])
    return reader.build_tensor(i, storages)


class TensorFile:
    """A lazily read file: `keys()`, `get(key)`, `metadata()`, `load()`; reads only the
    bytes asked for. Use as a context manager, or call close()."""

    def __init__(self, f: FileLike, *, verify: bool = True) -> None:
        with no_gc():
            self._reader = open_reader(f, verify)
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
        """Reads one tensor (and only the storage it views); `map_location` as in load,
        "meta" included (nothing is read then)."""
        index = self._reader.key_index().get(key)
        if index is None:
            raise KeyError(f"{self._reader.name}: no tensor at key path {key!r}")
        if key in self._reader.ambiguous:
            raise KeyError(
                f"{self._reader.name}: key path {key!r} names more than one tensor "
                "(dict keys containing '.' collide with nesting); use load() instead"
            )
        s = self._reader.layout.tensors[index].storage
        storages, meta = _read(
            self._reader, [s], map_location, self._verify, _config.num_threads(), False
        )
        return _tensor(self._reader, index, storages, meta)

    @property
    def format(self) -> str:
        """What the file is: "tensorfile", "torch.save" or "safetensors"."""
        return self._reader.format

    def metadata(self) -> dict[str, str]:
        """The str -> str metadata saved with the file (safetensors' __metadata__; empty for torch.save)."""
        return dict(self._reader.layout.metadata)

    def load(self, map_location: Any = None, *, num_threads: int | None = None) -> Any:
        """The whole object graph, as `tensorfile.load` gives it."""
        with no_gc():
            storages, meta = _read(
                self._reader,
                None,
                map_location,
                self._verify,
                _config.num_threads(num_threads),
                False,
            )
            return _build(self._reader, storages, meta)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(f: FileLike, *, verify: bool = True) -> TensorFile:
    """Opens a file for lazy reading; see TensorFile."""
    return TensorFile(f, verify=verify)
