"""Checkpoints in an object store (``s3://bucket/prefix``, gs://, az://): the same layout
as a directory, one object per file, moved by tensorfile._remote.

A rank's data object is the bytes `tensorfile.save` would write to a file, uploaded in one
multipart upload straight from the tensors' memory (no local file, no whole-file buffer);
the commit record is one PUT, written by the coordinator after every rank's upload
returned. Loads read the record, check that every data object it lists exists with its
recorded size (one LIST), parse each data object's header by ranged GETs, then fetch
exactly the byte ranges the plan needs into their destinations."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import FormatError
from .._io import Source, check_checksums, check_padding, checksum_host, raw_view
from .._reader import Reader
from .._remote import ObjectURL, get_bytes, list_objects, put_bytes
from .._remote import delete as delete_object
from .._remote import exists as object_exists
from .._remote import resolve as resolve_url
from ..formats import native
from ._common import DATA_NAME, METADATA_NAME, RANK_RECORD_NAME, IncompleteCheckpointError
from ._record import decode_record

Options = Mapping[str, Any] | None


def object_target(path: Any) -> ObjectURL | None:
    """The object URL `path` names, or None for a local path (``file://`` included).
    Raises ValueError for a URL with a scheme tensorfile does not serve."""
    target = resolve_url(path)
    return target if isinstance(target, ObjectURL) else None


def local_path(path: Any) -> str:
    """`path` as a local path str (``file://`` URLs decoded)."""
    import os

    target = resolve_url(path)
    return os.fspath(target)


def is_store_url(checkpoint_id: Any, write: bool = False) -> bool:
    """Whether `checkpoint_id` is an object URL tensorfile serves (http(s) only to read)."""
    try:
        target = object_target(checkpoint_id)
    except ValueError:
        return False
    return target is not None and not (write and target.kind == "http")


def exists(target: ObjectURL, options: Options) -> bool:
    return object_exists(target, storage_options=options)


# --------------------------------------------------------------------------- saving


def object_sizes(target: ObjectURL, options: Options) -> dict[str, int]:
    """{name: byte count} of the objects directly under `target` taken as a directory."""
    prefix = target.key.rstrip("/") + "/" if target.key else ""
    out = {}
    for info in list_objects(target, recursive=False, storage_options=options):
        out[info.key[len(prefix) :]] = info.nbytes
    return out


def commit(target: ObjectURL, name: str, blob: bytes, options: Options) -> None:
    """Writes the commit record `name` in one PUT: readers see the old record or the new."""
    put_bytes(target.child(name), blob, storage_options=options)


def remove_replaced(target: ObjectURL, keep: set[str], rank: int | None, options: Options) -> None:
    """After a commit: deletes the data objects under `target` that the new record does
    not list (with per-rank commits, only this rank's) and that no other commit record
    under it names. Failures are ignored: the commit stands, a later one retries."""
    try:
        names = object_sizes(target, options)
        others = [n for n in names if RANK_RECORD_NAME.match(n) or n == METADATA_NAME]
        for other in others:
            try:
                _, files = decode_record(
                    get_bytes(target.child(other), storage_options=options),
                    target.child(other).url,
                )
            except (OSError, ValueError):
                return  # a record we cannot read: remove nothing
            keep = keep | set(files)
        for n in names:
            m = DATA_NAME.match(n)
            if m is None or n in keep or (rank is not None and int(m.group(1)) != rank):
                continue
            delete_object(target.child(n), storage_options=options)
    except OSError:
        pass


# --------------------------------------------------------------------------- loading


def read_metadata(
    target: ObjectURL, name: str, rank: int | None, options: Options
) -> tuple[Any, dict[str, int]]:
    """Reads and checks commit record `name` under `target`, and that every data object
    it lists exists with the recorded byte count; as `_record.read_metadata` does for a
    directory, with the same errors."""
    record = target.child(name)
    try:
        blob = get_bytes(record, storage_options=options)
    except FileNotFoundError:
        names = object_sizes(target, options)
        if rank is not None and METADATA_NAME in names:
            raise IncompleteCheckpointError(
                f"{target.url}: no per-rank commit record {name}; this checkpoint has the "
                f"global record {METADATA_NAME} (see the error reading it)"
            ) from None
        data = [n for n in names if DATA_NAME.match(n)]
        if ".metadata" in names and not data:
            raise FormatError(
                f"{target.url}: this checkpoint was written by torch's FileSystemWriter, "
                "which tensorfile.dcp.StorageReader does not read from an object store"
            ) from None
        if data:
            raise IncompleteCheckpointError(
                f"{target.url}: checkpoint incomplete: its save did not commit ({name} is "
                f"missing; {len(data)} rank object(s) are present)"
            ) from None
        raise IncompleteCheckpointError(
            f"{target.url}: no checkpoint here ({name} is missing and no save has written data)"
        ) from None
    md, files = decode_record(blob, record.url)
    sizes = object_sizes(target, options) if files else {}
    problems = []
    for fname, want in files.items():
        got = sizes.get(fname)
        if got is None:
            problems.append(f"{fname} is missing")
        elif got != want:
            problems.append(f"{fname} holds {got} bytes, the commit recorded {want}")
    if problems:
        raise IncompleteCheckpointError(
            f"{target.url}: checkpoint damaged: {'; '.join(problems[:4])}"
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        )
    return md, files


def open_native(
    target: ObjectURL, name: str, nbytes: int, verify: bool, options: Options
) -> Reader:
    """tensorfile's reader over data object `name` (its header read by ranged GETs and
    validated as for a file); reads go through `reader.src.remote`."""
    src = Source(target.child(name).url, storage_options=options)  # one GET brings the header
    head = src.read(native.PREAMBLE_NBYTES, 0)
    if not head.startswith(native.MAGIC):
        raise FormatError(f"{src.name}: not a tensorfile; the checkpoint's rank files must be")
    layout, pad = native.read_layout(src.read, nbytes, head, src.name, verify)
    check_padding(src.name, pad, layout.header_end)
    if layout.storage_refs:
        raise FormatError(
            f"{src.name}: its storages refer to other files; a rank file holds its own"
        )
    return Reader(src, layout)


def flush(batch: Any, reader: Reader, verify: bool, threads: int) -> None:
    """Fetches a read batch's regions by concurrent ranged GETs, checks them, then runs
    the batch's copies and completions (the counterpart of the local `_flush`)."""
    src = reader.src
    assert src.remote is not None
    if batch.ptrs:
        ranges = [
            (int(off), raw_view(int(ptr), int(n)))
            for ptr, n, off in zip(batch.ptrs, batch.nbytes, batch.offsets)
        ]
        src.remote.read_ranges_into(ranges)
        if verify:
            want = np.array(batch.crcs, dtype=np.int64)
            checked = np.flatnonzero(want >= 0)
            ptrs = np.array(batch.ptrs, dtype=np.uint64)[checked]
            nbytes = np.array(batch.nbytes, dtype=np.uint64)[checked]
            got = checksum_host(ptrs, nbytes, threads=threads)

            def label(j: int) -> str:
                return repr(batch.labels[int(checked[j])])

            check_checksums(
                src.name,
                got,
                want[checked],
                label,
                remedy="re-save the checkpoint, or load with StorageReader(..., verify=False)",
            )
    for dst, s, n in batch.copies:
        ctypes.memmove(dst, s, n)
    for fn in batch.after:
        fn()
