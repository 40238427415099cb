"""The commit record of a checkpoint directory in this plugin's format: reading and
checking tensorfile-dcp.json, saying what is wrong when there is none, and opening the
rank files it names."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from .._errors import FormatError
from ._common import (
    DATA_NAME,
    MAX_JSON_DEPTH,
    MAX_METADATA_NBYTES,
    METADATA_NAME,
    IncompleteCheckpointError,
    check_json_depth,
    metadata_name,
    open_inside,
    open_rank_reader,
)
from ._metadata import decode_metadata


def read_metadata(
    path: str | os.PathLike[str], rank: int | None = None
) -> tuple[Metadata, dict[str, int]]:
    """Reads and checks the commit record of the checkpoint in directory `path`; returns
    DCP's Metadata and {data file: byte count}. Raises IncompleteCheckpointError when no
    save committed there or a listed file is missing or has the wrong size, FormatError
    for a record that is malformed, hostile or names anything but regular files inside
    the directory. Time and memory are linear in the record's size."""
    directory = os.fspath(path)
    name = metadata_name(rank)
    where = os.path.join(directory, name)
    try:
        fd = open_inside(directory, name, where)
    except FileNotFoundError:
        if rank is not None and os.path.lexists(os.path.join(directory, METADATA_NAME)):
            # DCP asks for a per-rank record only after the global one failed to load:
            # say so, rather than call the checkpoint uncommitted.
            raise IncompleteCheckpointError(
                f"{directory}: no per-rank commit record {name}; this checkpoint has the "
                f"global record {METADATA_NAME} (see the error reading it)"
            ) from None
        raise missing_metadata(directory, name) from None
    try:
        nbytes = os.fstat(fd).st_size
        if nbytes > MAX_METADATA_NBYTES:
            raise FormatError(f"{where}: {nbytes} bytes, over the {MAX_METADATA_NBYTES}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read()
    finally:
        os.close(fd)
    md, files = decode_record(blob, where)
    problems = []
    for fname, want in files.items():
        try:
            st = os.lstat(os.path.join(directory, fname))
        except FileNotFoundError:
            problems.append(f"{fname} is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise FormatError(
                f"{where}: rank file {fname} is {what}; a checkpoint's files must be inside "
                "its directory"
            )
        if st.st_size != want:
            problems.append(f"{fname} holds {st.st_size} bytes, the commit recorded {want}")
    if problems:
        raise IncompleteCheckpointError(
            f"{directory}: checkpoint damaged: {'; '.join(problems[:4])}"
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        )
    return md, files


def decode_record(blob: bytes, where: str) -> tuple[Metadata, dict[str, int]]:
    """Parses and checks the bytes of a commit record (`where` names it in errors);
    returns DCP's Metadata and {data file: byte count}. The files themselves are not
    looked at."""
    if len(blob) > MAX_METADATA_NBYTES:
        raise FormatError(f"{where}: {len(blob)} bytes, over the {MAX_METADATA_NBYTES}-byte limit")
    check_json_depth(blob, MAX_JSON_DEPTH, where)
    try:
        doc = json.loads(blob, object_pairs_hook=_unique_pairs)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{where}: not valid JSON ({e}); the metadata file is damaged") from None
    return decode_metadata(doc, where)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def missing_metadata(directory: str, name: str) -> Exception:
    if not os.path.isdir(directory):
        return FileNotFoundError(
            2, f"tensorfile.dcp: no checkpoint directory {directory}", directory
        )
    names = os.listdir(directory)
    data = [n for n in names if DATA_NAME.match(n)]
    tmps = [n for n in names if n.endswith(".tftmp") or n.endswith(".tmp")]
    if ".metadata" in names and not data:
        return FormatError(
            f"{directory}: this checkpoint was written by torch's FileSystemWriter; read it with "
            "FileSystemReader or tensorfile.dcp.dcp_to_state_dict"
        )
    if data or tmps:
        return IncompleteCheckpointError(
            f"{directory}: checkpoint incomplete: its save did not commit ({name} is missing; "
            f"{len(data)} rank file(s) and {len(tmps)} temporary file(s) are present)"
        )
    return IncompleteCheckpointError(
        f"{directory}: no checkpoint here ({name} is missing and no save has written data)"
    )


def open_native(directory: str, name: str, verify: bool) -> Any:
    """Opens rank file `name` of `directory` with tensorfile's own reader (header
    validated, checksummed), refusing links and anything outside the directory."""
    reader = open_rank_reader(directory, name, verify)
    if reader.format != "tensorfile":
        reader.close()
        raise FormatError(
            f"{os.path.join(directory, name)}: not a tensorfile; the checkpoint's rank files must be"
        )
    return reader
