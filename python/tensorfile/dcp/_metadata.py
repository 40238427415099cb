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

from .._dtypes import TORCH_ITEMSIZE
from .._errors import FormatError
from ..formats.native import MAX_NDIM
from ._common import (
    BLOCK_NBYTES,
    DATA_NAME,
    FORMAT,
    FORMAT_VERSION,
    MAX_DEPTH,
    MAX_KEY_PATH,
    MAX_LIST_GAPS,
    Location,
    check_tiling,
)

# --------------------------------------------------------------------------- metadata <-> JSON

_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".", 1)[1]


def _encode_value(v: Any, what: str, depth: int = 0) -> Any:
    """Plain values as tagged JSON, so tuples, int dict keys and torch.Size survive;
    `depth` counts the JSON levels used so far (a tagged container takes two)."""
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if depth >= MAX_DEPTH:
        raise TypeError(
            f"tensorfile.dcp: {what} is nested more than {MAX_DEPTH} JSON levels deep; "
            "checkpoint metadata must stay shallower"
        )
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if type(v) is tuple:
        return {"tuple": [_encode_value(x, what, depth + 2) for x in v]}
    if type(v) is list:
        return [_encode_value(x, what, depth + 1) for x in v]
    if type(v) is dict:
        return {
            "dict": [
                [_encode_value(k, what, depth + 3), _encode_value(x, what, depth + 3)]
                for k, x in v.items()
            ]
        }
    raise TypeError(
        f"tensorfile.dcp: {what} holds a {type(v).__name__}; checkpoint metadata is stored as "
        "JSON and can hold only None, bool, int, float, str, list, tuple, dict and torch.Size"
    )


def _decode_value(v: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"planner_data nested more than {MAX_DEPTH} deep")
    if type(v) is list:
        return [_decode_value(x, depth + 1) for x in v]
    if type(v) is dict:
        if len(v) != 1:
            raise ValueError("tagged value with more than one key")
        ((tag, body),) = v.items()
        if tag == "tuple" and type(body) is list:
            return tuple([_decode_value(x, depth + 2) for x in body])
        if tag == "size" and type(body) is list:
            return torch.Size(_size(body))
        if tag == "dict" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("tagged dict entry is not a [key, value] pair")
                out[_decode_value(pair[0], depth + 3)] = _decode_value(pair[1], depth + 3)
            return out
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        raise ValueError(f"unknown tag {tag!r}")
    if type(v) is int and not -(2**63) <= v < 2**64:
        raise ValueError("planner_data holds an integer outside 64 bits")
    return v


def mappings_problem(mappings: dict[Any, Any]) -> str | None:
    """What is wrong with the planner's {fqn: key path} mappings, or None: every key path
    is a non-empty tuple of str and non-negative int parts, at most MAX_KEY_PATH long, and
    the lists the paths describe leave at most MAX_LIST_GAPS empty slots in all (so
    rebuilding the nested state dict costs what the record costs). Linear in the paths."""
    children: dict[tuple[int, Any], int] = {}  # (trie node, path part) -> node
    list_top: dict[int, int] = {}  # trie node of a list -> its largest index
    used = 0
    for fqn, path in mappings.items():
        if type(fqn) is not str:
            return "a planner_data key is not a string"
        if type(path) not in (tuple, list) or not path:
            return f"planner_data key path of {fqn!r} is not a non-empty sequence"
        if len(path) > MAX_KEY_PATH:
            return f"planner_data key path of {fqn!r} has more than {MAX_KEY_PATH} parts"
        node = 0
        for part in path:
            if type(part) is int:
                if part < 0:
                    return f"planner_data key path of {fqn!r} has a negative index"
                if list_top.get(node, -1) < part:
                    list_top[node] = part
            elif type(part) is not str:
                return f"planner_data key path of {fqn!r} holds a {type(part).__name__}"
            nxt = children.get((node, part))
            if nxt is None:
                nxt = children[(node, part)] = len(children) + 1
                used += type(part) is int
            node = nxt
    gaps = sum(top + 1 for top in list_top.values()) - used
    if gaps > MAX_LIST_GAPS:
        return (
            f"planner_data key paths leave {gaps} empty list slots, more than {MAX_LIST_GAPS} "
            "(an index far past its list's items)"
        )
    return None


def _encode_planner_data(v: Any) -> Any:
    # The default planners record {fqn: key path tuple of str and int}: stored as lists.
    if type(v) is dict and all(
        type(k) is str and type(p) is tuple and all(type(x) in (str, int) for x in p)
        for k, p in v.items()
    ):
        problem = mappings_problem(v)
        if problem is not None:
            raise TypeError(f"tensorfile.dcp: {problem}")
        return {"mappings": {k: list(p) for k, p in v.items()}}
    return {"value": _encode_value(v, "planner_data", 3)}


def _decode_planner_data(v: Any, fqns: dict[str, Any]) -> Any:
    if type(v) is not dict or len(v) != 1:
        raise ValueError("planner_data")
    if "mappings" in v:
        mappings = v["mappings"]
        if type(mappings) is not dict:
            raise ValueError("planner_data mappings")
        problem = mappings_problem(mappings)
        if problem is not None:
            raise ValueError(problem)
        out = {}
        for k, p in mappings.items():
            if k not in fqns:
                raise ValueError(f"planner_data maps {k!r}, which the checkpoint does not hold")
            out[k] = tuple(p)
        return out
    if "value" in v:
        return _decode_value(v["value"], 3)
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
    """Rebuilds DCP's dataclasses from the JSON record, checking everything first: any
    malformed field is a FormatError naming the file (never a KeyError from deep inside a
    load). The chunks of each tensor must tile it exactly, every chunk and BYTE_IO entry
    must have one storage entry of the right byte count, and the entries of each rank
    file must fit in its recorded size; so what a load allocates is bounded by the bytes
    on disk. Time and memory are linear in the record."""
    if type(doc) is not dict or doc.get("format") != FORMAT:
        raise FormatError(f"{where}: not a tensorfile DCP metadata file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where}: metadata format version {doc.get('format_version')!r} is not supported "
            f"(this tensorfile reads version {FORMAT_VERSION}); upgrade tensorfile"
        )
    try:
        return _decode(doc, where)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(
            f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
        ) from None


def _decode(doc: dict[str, Any], where: str) -> tuple[Metadata, dict[str, int]]:
    block = doc["block_nbytes"]
    if type(block) is not int or not 0 < block < 2**40:
        raise ValueError("block_nbytes")
    file_rows = doc["files"]
    if type(file_rows) is not list or not all(
        type(r) is list
        and len(r) == 2
        and type(r[0]) is str
        and DATA_NAME.match(r[0])
        and type(r[1]) is int
        and 0 <= r[1] < 2**63
        for r in file_rows
    ):
        raise ValueError("files")
    file_names = [r[0] for r in file_rows]
    files = {r[0]: r[1] for r in file_rows}
    if len(files) != len(file_names):
        raise ValueError("files: a rank file is listed twice")
    props = []
    prop_rows = doc["properties"]
    if type(prop_rows) is not list:
        raise ValueError("properties")
    for row in prop_rows:
        if type(row) is not list or len(row) != 4:
            raise ValueError("properties row")
        dtype_name, rg, mf, pin = row
        known = type(dtype_name) is str and dtype_name in TORCH_ITEMSIZE
        dtype = getattr(torch, dtype_name, None) if known else None
        if not isinstance(dtype, torch.dtype) or type(rg) is not bool or type(pin) is not bool:
            raise ValueError(
                f"dtype {dtype_name!r}" if not isinstance(dtype, torch.dtype) else "properties row"
            )
        if type(mf) is not str or mf not in _MEMORY_FORMATS:
            raise ValueError(f"memory format {mf!r}")
        props.append(
            TensorProperties(
                dtype=dtype,
                layout=torch.strided,
                requires_grad=rg,
                memory_format=_MEMORY_FORMATS[mf],
                pin_memory=pin,
            )
        )
    sizes: dict[tuple[Any, ...], torch.Size] = {}
    sdm: dict[str, Any] = {}
    # (fqn, chunk offsets or None) -> the byte count its storage entry must have
    expected: dict[tuple[str, Any], int] = {}
    entries = doc["state_dict_metadata"]
    if type(entries) is not dict:
        raise ValueError("state_dict_metadata")
    for fqn, e in entries.items():
        if e is None:
            sdm[fqn] = BytesStorageMetadata()
            expected[(fqn, None)] = -1  # any byte count
            continue
        if type(e) is not list or len(e) != 3 or type(e[2]) is not list:
            raise ValueError(f"entry of {fqn!r}")
        pi, size_raw, chunk_rows = e
        if type(pi) is not int or not 0 <= pi < len(props):
            raise ValueError(f"properties of {fqn!r}")
        size = _size(size_raw, sizes)
        chunks = []
        for row in chunk_rows:
            if type(row) is not list or len(row) != 2:
                raise ValueError(f"chunk row of {fqn!r}")
            chunks.append(
                ChunkStorageMetadata(offsets=_size(row[0], sizes), sizes=_size(row[1], sizes))
            )
        try:
            check_tiling(tuple(size), [(tuple(c.offsets), tuple(c.sizes)) for c in chunks])
        except ValueError as err:
            raise ValueError(f"the chunks of {fqn!r}: {err}") from None
        isz = props[pi].dtype.itemsize
        for c in chunks:
            nb = math.prod(c.sizes) * isz
            slot = (fqn, tuple(c.offsets))
            expected[slot] = max(expected.get(slot, 0), nb)
        sdm[fqn] = TensorStorageMetadata(properties=props[pi], size=size, chunks=chunks)
    sd = doc["storage_data"]
    if type(sd) is not dict:
        raise ValueError("storage_data")
    fqns, offsets, hints, fidx, nbytes, blocks = (
        sd["fqn"],
        sd["offset"],
        sd["index"],
        sd["file"],
        sd["nbytes"],
        sd["block_crcs"],
    )
    if type(fqns) is not list:
        raise ValueError("storage_data fqn column")
    n = len(fqns)
    if not all(type(col) is list and len(col) == n for col in (offsets, hints, fidx, nbytes)):
        raise ValueError("storage_data columns differ in length")
    if type(blocks) is not dict or not all(
        type(k) is str and k.isdigit() and int(k) < n and type(v) is list for k, v in blocks.items()
    ):
        raise ValueError("block_crcs")
    if n != len(expected):
        raise ValueError(
            f"storage_data has {n} entries for {len(expected)} chunks and BYTE_IO values"
        )
    storage: dict[MetadataIndex, Location] = {}
    suffixes: dict[Any, str] = {}
    used = [0] * len(file_names)
    for j in range(n):
        fqn, off, f, nb, hint = fqns[j], offsets[j], fidx[j], nbytes[j], hints[j]
        if type(fqn) is not str or type(f) is not int or not 0 <= f < len(file_names):
            raise ValueError(f"storage entry {j}")
        if type(nb) is not int or not 0 <= nb < 2**63:
            raise ValueError(f"byte count of {fqn!r}")
        if hint is not None and (type(hint) is not int or not 0 <= hint < 2**63):
            raise ValueError(f"index hint of {fqn!r}")
        offset = None if off is None else _size(off, sizes)
        want = expected.pop((fqn, None if offset is None else tuple(offset)), None)
        if want is None:
            raise ValueError(
                f"storage entry {j} ({fqn!r} at {off}) matches no chunk or BYTE_IO value, "
                "or repeats one"
            )
        if want >= 0 and nb != want:
            raise ValueError(f"byte count of {fqn!r} at {off}: {nb}, the chunk holds {want}")
        used[f] += nb
        crcs = blocks.get(str(j), ())
        if crcs and (
            len(crcs) != -(-nb // block) or not all(type(c) is int and 0 <= c < 2**32 for c in crcs)
        ):
            raise ValueError(f"block checksums of {fqn!r}")
        index = MetadataIndex(fqn, offset, hint)
        if off is None:
            key = fqn
        else:  # as item_key, with the offsets' text shared between items
            suffix = suffixes.get(index.offset)
            if suffix is None:
                suffix = suffixes[index.offset] = "@" + ",".join(map(str, off))
            key = fqn + suffix
        storage[index] = Location(file_names[f], key, nb, tuple(crcs))
    for name, nb in zip(file_names, used):
        if nb > files[name]:
            raise ValueError(f"the entries of {name} hold {nb} bytes, more than its {files[name]}")
    sm = doc["storage_meta"]
    if sm is None:
        storage_meta = None
    else:
        if type(sm) is not dict or not all(
            sm[k] is None or type(sm[k]) is str for k in ("checkpoint_id", "save_id", "load_id")
        ):
            raise ValueError("storage_meta")
        modules = sm["modules"]
        if type(modules) is not list or not all(type(m) is str for m in modules):
            raise ValueError("storage_meta modules")
        storage_meta = StorageMeta(
            checkpoint_id=sm["checkpoint_id"],
            save_id=sm["save_id"],
            load_id=sm["load_id"],
            modules=list(modules),
        )
    version = doc["dcp_version"]
    if type(version) is not str:
        raise ValueError("dcp_version")
    if block != BLOCK_NBYTES and any(loc.block_crcs for loc in storage.values()):
        raise FormatError(f"{where}: checksum block size {block} is not supported")
    md = Metadata(
        state_dict_metadata=sdm,
        planner_data=_decode_planner_data(doc["planner_data"], sdm),
        storage_data=storage,
        storage_meta=storage_meta,
        version=version,
    )
    return md, files


def _size(v: Any, cache: dict[tuple[Any, ...], torch.Size] | None = None) -> torch.Size:
    """A validated torch.Size from a JSON list (at most MAX_NDIM dimensions of 0 to
    2**63 - 1); `cache` shares equal sizes (20,000 small tensors have a handful of
    distinct shapes and offsets)."""
    if type(v) is not list or len(v) > MAX_NDIM:
        raise ValueError(f"bad shape {v!r}"[:200])
    key = None
    if cache is not None:
        key = tuple(v)
        hit = cache.get(key)  # a list element (unhashable) raises TypeError: malformed
        if hit is not None:
            return hit
    for x in v:
        if type(x) is not int or not 0 <= x < 2**63:
            raise ValueError(f"bad shape {v!r}"[:200])
    out = torch.Size(v)
    if cache is not None and key is not None:
        cache[key] = out
    return out
