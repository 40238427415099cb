"""DCP metadata <-> JSON: the commit record, without pickle."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .._errors import FormatError
from ._common import BLOCK_NBYTES, DATA_NAME, FORMAT, FORMAT_VERSION, Location

# --------------------------------------------------------------------------- metadata <-> JSON

_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".", 1)[1]


def _encode_value(v: Any, what: str) -> Any:
    """Plain values as tagged JSON, so tuples, int dict keys and torch.Size survive."""
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if type(v) is tuple:
        return {"tuple": [_encode_value(x, what) for x in v]}
    if type(v) is list:
        return [_encode_value(x, what) for x in v]
    if type(v) is dict:
        return {"dict": [[_encode_value(k, what), _encode_value(x, what)] for k, x in v.items()]}
    raise TypeError(
        f"tensorfile.dcp: {what} holds a {type(v).__name__}; checkpoint metadata is stored as "
        "JSON and can hold only None, bool, int, float, str, list, tuple, dict and torch.Size"
    )


def _decode_value(v: Any) -> Any:
    if type(v) is list:
        return [_decode_value(x) for x in v]
    if type(v) is dict:
        if len(v) != 1:
            raise ValueError("tagged value with more than one key")
        ((tag, body),) = v.items()
        if tag == "tuple":
            return tuple(_decode_value(x) for x in body)
        if tag == "size":
            return torch.Size(int(x) for x in body)
        if tag == "dict":
            return {_decode_value(k): _decode_value(x) for k, x in body}
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        raise ValueError(f"unknown tag {tag!r}")
    return v


def _encode_planner_data(v: Any) -> Any:
    # The default planners record {fqn: key path tuple of str and int}: stored as lists.
    if type(v) is dict and all(
        type(k) is str and type(p) is tuple and all(type(x) in (str, int) for x in p)
        for k, p in v.items()
    ):
        return {"mappings": {k: list(p) for k, p in v.items()}}
    return {"value": _encode_value(v, "planner_data")}


def _decode_planner_data(v: Any) -> Any:
    if type(v) is not dict or len(v) != 1:
        raise ValueError("planner_data")
    if "mappings" in v:
        out = {}
        for k, p in v["mappings"].items():
            if type(p) is not list or not all(type(x) in (str, int) for x in p):
                raise ValueError(f"planner_data key path of {k!r}")
            out[k] = tuple(p)
        return out
    if "value" in v:
        return _decode_value(v["value"])
    raise ValueError("planner_data")


def encode_metadata(md: Metadata, sizes: dict[str, int]) -> dict[str, Any]:
    """DCP's Metadata as JSON-ready columns: one properties table, one entry per state
    dict key, and the storage index as parallel arrays (20,000 items stay cheap)."""
    props: dict[tuple[Any, ...], int] = {}
    entries: dict[str, Any] = {}
    for fqn, sm in md.state_dict_metadata.items():
        if isinstance(sm, BytesStorageMetadata):
            entries[fqn] = None
            continue
        if not isinstance(sm, TensorStorageMetadata):
            raise TypeError(
                f"tensorfile.dcp: unknown storage metadata {type(sm).__name__} for {fqn!r}"
            )
        p = sm.properties
        pk = (p.dtype, p.layout, p.requires_grad, p.memory_format, p.pin_memory)
        pi = props.get(pk)
        if pi is None:
            if p.layout != torch.strided:
                raise TypeError(
                    f"tensorfile.dcp: {fqn!r} has layout {p.layout}; only strided tensors are supported"
                )
            if not any(f == p.memory_format for f in _MEMORY_FORMATS.values()):
                raise TypeError(f"tensorfile.dcp: {fqn!r} has memory format {p.memory_format}")
            pi = props[pk] = len(props)
        entries[fqn] = [pi, list(sm.size), [[list(c.offsets), list(c.sizes)] for c in sm.chunks]]
    prop_rows = [
        [
            _dtype_name(dtype),
            bool(rg),
            next(k for k, f in _MEMORY_FORMATS.items() if f == mf),
            bool(pin),
        ]
        for dtype, _layout, rg, mf, pin in props
    ]
    file_names = sorted(sizes)
    file_index = {n: i for i, n in enumerate(file_names)}
    fqns, offsets, hints, files, nbytes = [], [], [], [], []
    blocks: dict[str, list[int]] = {}
    for j, (index, loc) in enumerate(md.storage_data.items()):
        fqns.append(index.fqn)
        offsets.append(None if index.offset is None else list(index.offset))
        hints.append(index.index)
        files.append(file_index[loc.file])
        nbytes.append(loc.nbytes)
        if loc.block_crcs:
            blocks[str(j)] = list(loc.block_crcs)
    sm_ = md.storage_meta
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dcp_version": md.version,
        "block_nbytes": BLOCK_NBYTES,
        "files": [[n, sizes[n]] for n in file_names],
        "properties": prop_rows,
        "state_dict_metadata": entries,
        "planner_data": _encode_planner_data(md.planner_data),
        "storage_data": {
            "fqn": fqns,
            "offset": offsets,
            "index": hints,
            "file": files,
            "nbytes": nbytes,
            "block_crcs": blocks,
        },
        "storage_meta": None
        if sm_ is None
        else {
            "checkpoint_id": None if sm_.checkpoint_id is None else os.fspath(sm_.checkpoint_id),
            "save_id": sm_.save_id,
            "load_id": sm_.load_id,
            "modules": list(sm_.modules),
        },
    }


def decode_metadata(doc: Any, where: str) -> tuple[Metadata, dict[str, int]]:
    """Rebuilds DCP's dataclasses from the JSON record; any malformed field is a
    FormatError naming the file (never a KeyError from deep inside a load)."""
    if type(doc) is not dict or doc.get("format") != FORMAT:
        raise FormatError(f"{where}: not a tensorfile DCP metadata file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where}: metadata format version {doc.get('format_version')!r} is not supported "
            f"(this tensorfile reads version {FORMAT_VERSION}); upgrade tensorfile"
        )
    try:
        block = doc["block_nbytes"]
        if type(block) is not int or block <= 0:
            raise ValueError("block_nbytes")
        file_rows = doc["files"]
        if type(file_rows) is not list or not all(
            type(r) is list
            and len(r) == 2
            and type(r[0]) is str
            and DATA_NAME.match(r[0])
            and type(r[1]) is int
            and r[1] >= 0
            for r in file_rows
        ):
            raise ValueError("files")
        file_names = [r[0] for r in file_rows]
        files = dict(map(tuple, file_rows))
        props = []
        for dtype_name, rg, mf, pin in doc["properties"]:
            dtype = getattr(torch, dtype_name, None) if type(dtype_name) is str else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {dtype_name!r}")
            props.append(
                TensorProperties(
                    dtype=dtype,
                    layout=torch.strided,
                    requires_grad=bool(rg),
                    memory_format=_MEMORY_FORMATS[mf],
                    pin_memory=bool(pin),
                )
            )
        sizes: dict[tuple[Any, ...], torch.Size] = {}
        sdm: dict[str, Any] = {}
        for fqn, e in doc["state_dict_metadata"].items():
            if e is None:
                sdm[fqn] = BytesStorageMetadata()
                continue
            pi, size_raw, chunk_rows = e
            size = _size(size_raw, sizes)
            chunks = []
            for off, sz in chunk_rows:
                o, c = _size(off, sizes), _size(sz, sizes)
                if (
                    len(o) != len(size)
                    or len(c) != len(size)
                    or any(a + b > n for a, b, n in zip(o, c, size))
                ):
                    raise ValueError(f"chunk {list(o)}+{list(c)} outside {list(size)} of {fqn!r}")
                chunks.append(ChunkStorageMetadata(offsets=o, sizes=c))
            if type(pi) is not int or not 0 <= pi < len(props):
                raise ValueError(f"properties of {fqn!r}")
            sdm[fqn] = TensorStorageMetadata(properties=props[pi], size=size, chunks=chunks)
        sd = doc["storage_data"]
        fqns, offsets, hints, fidx, nbytes, blocks = (
            sd["fqn"],
            sd["offset"],
            sd["index"],
            sd["file"],
            sd["nbytes"],
            sd["block_crcs"],
        )
        n = len(fqns)
        if not all(type(col) is list and len(col) == n for col in (offsets, hints, fidx, nbytes)):
            raise ValueError("storage_data columns differ in length")
        if type(blocks) is not dict:
            raise ValueError("block_crcs")
        storage: dict[MetadataIndex, Location] = {}
        suffixes: dict[Any, str] = {}
        for j in range(n):
            fqn, off, f, nb = fqns[j], offsets[j], fidx[j], nbytes[j]
            if type(fqn) is not str or type(f) is not int or not 0 <= f < len(file_names):
                raise ValueError(f"storage entry {j}")
            if type(nb) is not int or nb < 0:
                raise ValueError(f"byte count of {fqn!r}")
            crcs = blocks.get(str(j), ())
            if crcs and (
                len(crcs) != -(-nb // block)
                or not all(type(c) is int and 0 <= c < 2**32 for c in crcs)
            ):
                raise ValueError(f"block checksums of {fqn!r}")
            index = MetadataIndex(
                fqn,
                None if off is None else _size(off, sizes),
                hints[j] if type(hints[j]) is int else None,
            )
            if off is None:
                key = fqn
            else:  # as item_key, with the offsets' text shared between items
                suffix = suffixes.get(index.offset)
                if suffix is None:
                    suffix = suffixes[index.offset] = "@" + ",".join(map(str, off))
                key = fqn + suffix
            storage[index] = Location(file_names[f], key, nb, tuple(crcs))
        sm = doc["storage_meta"]
        storage_meta = (
            None
            if sm is None
            else StorageMeta(
                checkpoint_id=sm["checkpoint_id"],
                save_id=sm["save_id"],
                load_id=sm["load_id"],
                modules=[str(m) for m in sm["modules"]],
            )
        )
        md = Metadata(
            state_dict_metadata=sdm,
            planner_data=_decode_planner_data(doc["planner_data"]),
            storage_data=storage,
            storage_meta=storage_meta,
            version=doc["dcp_version"],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(
            f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
        ) from None
    if block != BLOCK_NBYTES and any(loc.block_crcs for loc in storage.values()):
        raise FormatError(f"{where}: checksum block size {block} is not supported")
    return md, files


def _size(v: Any, cache: dict[tuple[Any, ...], torch.Size] | None = None) -> torch.Size:
    """A validated torch.Size from a JSON list; `cache` shares equal sizes (20,000 small
    tensors have a handful of distinct shapes and offsets)."""
    if type(v) is not list:
        raise ValueError(f"bad shape {v!r}")
    if cache is not None:
        key = tuple(v)
        hit = cache.get(key)  # a list element (unhashable) raises TypeError: malformed
        if hit is not None:
            return hit
    for x in v:
        if type(x) is not int or x < 0:
            raise ValueError(f"bad shape {v!r}")
    out = torch.Size(v)
    if cache is not None:
        cache[key] = out
    return out


# --------------------------------------------------------------------------- reader
