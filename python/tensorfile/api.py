"""The public functions: save, load, open, save_safetensors. Argument handling only; the
work is in _io (bytes), _reader (files) and _plan (what a save writes)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any, NamedTuple

from . import _config, _cuda, _io
from ._files import FileLike, PathLike
from ._plan import check_metadata, plan_safetensors
from ._reader import open_reader
from ._tree import no_gc, tensor_paths


def save(
    obj: Any,
    f: FileLike,
    *,
    durable: bool = True,
    num_threads: int | None = None,
    metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Saves `obj` (tensors, arrays, containers of them, plain values) to `f`.

    `f` is a path, a writable binary file-like object, or an object-store URL
    (s3://bucket/key, gs://, az://; configured as the cloud's own tools are, overridden by
    `storage_options`), written by one multipart upload that completes only when whole
    (the old object stays until then; a failure aborts it). For a path, the file is written
    beside the target under a temporary name, then renamed over it, so `f` holds the
    old file or the new one and never a mix; with `durable=True` (the default) the data
    and the rename are fsynced before this returns, so the file survives power loss.
    `metadata` is a str -> str dict stored in the header. Raises TypeError naming the key
    path of anything that cannot be saved; on any error the target is left as it was.
    Releases the GIL while bytes move; `num_threads` defaults to TENSORFILE_NUM_THREADS
    or the core count.
    """
    with no_gc():
        _io.save(
            obj,
            f,
            durable=durable,
            num_threads=num_threads,
            metadata=metadata,
            storage_options=storage_options,
        )


def save_safetensors(
    tensors: dict[str, Any],
    path: PathLike,
    metadata: dict[str, str] | None = None,
    *,
    copy_shared: bool = False,
    durable: bool = True,
    num_threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
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
            storage_options=storage_options,
        )
        del plan


def load(
    f: FileLike,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    into: Any = None,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    verify: bool = True,
    num_threads: int | None = None,
    pin_memory: bool = False,
    storage_options: dict[str, Any] | None = None,
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

    `into` (an in-place load) is a nested container of tensors, such as
    `{"model": model.state_dict(), "optim": opt.state_dict()}`: every tensor of the file
    whose key path exists in `into` with the same dtype and shape is read into that
    tensor's memory, on its device, and the result holds those very tensors; a key path
    whose dtype or shape differs raises ValueError naming every mismatch before any byte
    is read. Tensors not in `into` are allocated as usual; other values come from the file.

    `f` may be an object-store URL (s3://bucket/key, gs://, az://, http(s)://): the header
    comes with the first ranged GET, the storages by concurrent ranged GETs straight into
    their destinations (TENSORFILE_REMOTE_PART_NBYTES, TENSORFILE_REMOTE_CONCURRENCY);
    `storage_options` override the store's configuration.
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
        reader = open_reader(f, verify, storage_options=storage_options)
        reader.pin_memory = pin_memory
        try:
            dests, direct = (
                reader.destinations(_torch_targets(into)) if into is not None else ({}, {})
            )
            storages = reader.read_storages(
                None, map_location, verify, _config.num_threads(num_threads), use_mmap, direct
            )
            out = reader.build(storages, dests, direct)
        finally:
            reader.close()
        # Free the header's many small objects while the collector is still paused:
        # alive at gc.enable(), they would make its next pass walk them all.
        del reader, storages
        return out


def _torch_targets(into: Any) -> dict[str, Any]:
    """{key path: tensor} of an `into` container (torch tensors only)."""
    import torch

    return tensor_paths(into, lambda x: isinstance(x, torch.Tensor))


class IncompatibleKeys(NamedTuple):
    """What load_model returns, as `load_state_dict` does."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_model(
    module: Any, f: FileLike, *, strict: bool = True, prefix: str = ""
) -> IncompatibleKeys:
    """Reads the state dict in `f` (or the sub-tree under `prefix`, such as "model." of a
    checkpoint) straight into `module`'s parameters and buffers, with no second copy of
    them in memory. Returns (missing_keys, unexpected_keys) as
    `module.load_state_dict` does; with `strict=True` either raises RuntimeError before
    any byte is read. Reads only the storages of the tensors it fills."""
    import torch

    state = module.state_dict()
    targets = {prefix + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    with no_gc(), open_reader(f) as reader:
        keys = reader.key_index()
        missing = [k for k in state if prefix + k not in keys]
        unexpected = [
            k[len(prefix) :] for k in keys if k.startswith(prefix) and k[len(prefix) :] not in state
        ]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"{reader.name}: error loading the state dict into {type(module).__name__}: "
                f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}"
            )
        dests, direct = reader.destinations(targets)
        which = sorted({reader.layout.tensors[i].storage for i in dests})
        storages = reader.read_storages(which, "cpu", True, _config.num_threads(), False, direct)
        reader.fill(storages, dests, direct)
    return IncompatibleKeys(missing, unexpected)


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


class TensorFile:
    """A lazily read file: `keys()`, `get(key)`, `metadata()`, `load()`; reads only the
    bytes asked for. Use as a context manager, or call close()."""

    def __init__(
        self, f: FileLike, *, verify: bool = True, storage_options: dict[str, Any] | None = None
    ) -> None:
        with no_gc():
            self._reader = open_reader(f, verify, storage_options=storage_options)
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
        """The whole object graph, as `tensorfile.load` gives it."""
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


def open(
    f: FileLike, *, verify: bool = True, storage_options: dict[str, Any] | None = None
) -> TensorFile:
    """Opens a file (or an object-store URL, whose `get` fetches only the byte ranges of
    the tensors asked for) for lazy reading; see TensorFile."""
    return TensorFile(f, verify=verify, storage_options=storage_options)
