"""Coverage-guided fuzzing (atheris) of torch.distributed.checkpoint metadata: tensorfile's
commit record (tensorfile-dcp.json) and the `.metadata` pickle of torch's FileSystemWriter.

Each input is one metadata file, placed in a checkpoint directory whose data files are
fixed (built at start-up); then read_metadata, dcp_to_state_dict, verify_checkpoint and
convert_checkpoint must each succeed or raise tensorfile.FormatError. Anything else (another
exception, a crash, a hang, a memory blow-up, a file opened outside the directory) is a
finding. The first byte of an input picks what the rest is: bit 0 clear, a commit record
(bit 1 set: the harness first corrects the rank files' recorded sizes, so mutations get
past that check); bit 0 set, a stock `.metadata` pickle. With bit 2 set the rest is not
the file but a recipe: a few fields of a valid record (or stock Metadata) replaced by
values chosen from the bytes, so that mutations reach the semantic checks. Run:

    python fuzz/fuzz_dcp.py NEW_CORPUS_DIR fuzz/corpus-dcp -max_total_time=60 -rss_limit_mb=2048

New inputs go to the first directory; fuzz/corpus-dcp holds the seeds (written by
fuzz/make_corpus_dcp.py) and every input that ever failed (add it there as a regression file).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import tempfile
import warnings
from typing import Any

warnings.simplefilter("ignore")

import atheris  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

with atheris.instrument_imports(include=["tensorfile"]):  # coverage of tensorfile only
    import tensorfile
    import tensorfile.dcp as tdcp
    from tensorfile import FormatError
    from tensorfile.dcp import _assemble, _export, _metadata, _reader, _stock  # noqa: F401

RANK_FILES = ("__0_00000000000000ab.tf", "__1_00000000000000ab.tf")
_BASE = "/dev/shm" if os.path.isdir("/dev/shm") else None
_ROOT = tempfile.mkdtemp(prefix="tensorfile-fuzz-dcp-", dir=_BASE)
OURS = os.path.join(_ROOT, "ours")
STOCK = os.path.join(_ROOT, "stock")
# Beside the directories, a FIFO: a reader that a checkpoint could make open it (by a
# `../outside.distcp` or absolute name) would block there, and the fuzzer reports a hang.
OUTSIDE = os.path.join(_ROOT, "outside.distcp")

# The tensors of the fixed checkpoints and the chunks each is saved as.
W = torch.arange(24, dtype=torch.float32).reshape(6, 4)
CHUNKS: dict[str, tuple[torch.Tensor, list[tuple[list[int], list[int]]], int]] = {
    # fqn: (full tensor, [(offsets, sizes)], rank file)
    "model.w": (W, [([0, 0], [3, 2]), ([0, 2], [3, 2]), ([3, 0], [3, 4])], 0),
    "model.v": (torch.arange(5), [([0], [5])], 1),
    "model.m": (torch.tensor([True, False, True]), [([0], [3])], 1),
    "s": (torch.tensor(2.5, dtype=torch.float64), [([], [])], 0),
}


def _key(fqn: str, off: list[int]) -> str:
    return f"{fqn}@{','.join(map(str, off))}"


def _byte_item(value: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(value, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def build() -> None:
    """The fixed data files: two rank files in this plugin's format, one FileSystemWriter
    data file, and the FIFO outside both directories."""
    os.makedirs(OURS, exist_ok=True)
    files: list[dict[str, torch.Tensor]] = [{}, {}]
    for fqn, (full, boxes, r) in CHUNKS.items():
        for off, sz in boxes:
            files[r][_key(fqn, off)] = full[tuple(slice(o, o + n) for o, n in zip(off, sz))].clone()
    files[0]["step"] = _byte_item(7)
    files[1]["opt.betas"] = _byte_item((0.9, 0.99))
    for name, items in zip(RANK_FILES, files):
        tensorfile.save(items, os.path.join(OURS, name), durable=False)
    if not os.path.isdir(STOCK):
        dcp.save(stock_state(), storage_writer=dcp.FileSystemWriter(STOCK), no_dist=True)
    if not os.path.exists(OUTSIDE):
        os.mkfifo(OUTSIDE)


def stock_state() -> dict[str, Any]:
    return {"model": {"w": W, "v": torch.arange(5)}, "step": 7, "opt": {"betas": (0.9, 0.99)}}


def record() -> dict[str, Any]:
    """A commit record for the rank files of build()."""
    sizes = {n: os.path.getsize(os.path.join(OURS, n)) for n in RANK_FILES}
    items = {n: tensorfile.load(os.path.join(OURS, n)) for n in RANK_FILES}
    props: list[list[Any]] = []
    sdm: dict[str, Any] = {}
    cols: dict[str, list[Any]] = {"fqn": [], "offset": [], "index": [], "file": [], "nbytes": []}
    for fqn, (full, boxes, r) in CHUNKS.items():
        row = [str(full.dtype).removeprefix("torch."), False, "contiguous_format", False]
        if row not in props:
            props.append(row)
        sdm[fqn] = [props.index(row), list(full.shape), [[o, s] for o, s in boxes]]
        for off, sz in boxes:
            for col, v in zip(cols, (fqn, off, 0, r, math.prod(sz) * full.element_size())):
                cols[col].append(v)
    for fqn, r in (("step", 0), ("opt.betas", 1)):
        sdm[fqn] = None
        for col, v in zip(cols, (fqn, None, None, r, items[RANK_FILES[r]][fqn].numel())):
            cols[col].append(v)
    return {
        "format": "tensorfile-dcp",
        "format_version": 1,
        "dcp_version": "1.0.0",
        "block_nbytes": 1 << 20,
        "files": [[n, sizes[n]] for n in RANK_FILES],
        "properties": props,
        "state_dict_metadata": sdm,
        "planner_data": {"mappings": {f: f.split(".") for f in sdm}},
        "storage_data": {**cols, "block_crcs": {"2": [_crc(items[RANK_FILES[0]], "model.w@3,0")]}},
        "storage_meta": {"checkpoint_id": None, "save_id": "ab", "load_id": None, "modules": []},
    }


def _crc(items: dict[str, torch.Tensor], key: str) -> int:
    from tensorfile import _engine

    return int(_engine.crc32c(items[key].numpy().tobytes()))


_INTS = [0, 1, -1, 2, 3, 4, 5, 6, 7, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]
_STRS = ["", "model.w", "model.v", "step", "s", RANK_FILES[0], "float32", "bool", "uint8", "qint8",
         "../outside.distcp", OUTSIDE, "channels_last", "tuple", "size", "dict", "float", "nan",
         "mappings", "value", "__0_0.distcp", "model", "opt.betas"]  # fmt: skip


def _value(fdp: Any, depth: int, stock: bool) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 3 else 4)
    if kind == 0:
        return _INTS[fdp.ConsumeIntInRange(0, len(_INTS) - 1)]
    if kind == 1:
        return _STRS[fdp.ConsumeIntInRange(0, len(_STRS) - 1)]
    if kind == 2:
        return fdp.ConsumeIntInRange(-3, 40)
    if kind == 3:
        return None if fdp.ConsumeBool() else fdp.ConsumeBool()
    if kind == 4:
        return (
            torch.Size(fdp.ConsumeIntInRange(0, 7) for _ in range(fdp.ConsumeIntInRange(0, 3)))
            if stock
            else fdp.ConsumeFloat()
        )
    if kind == 5:
        return [_value(fdp, depth + 1, stock) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 6:
        return tuple(_value(fdp, depth + 1, stock) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    return {_STRS[fdp.ConsumeIntInRange(0, len(_STRS) - 1)]: _value(fdp, depth + 1, stock)}


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value inside `obj`: dict values, list items and the
    fields of objects."""
    out: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        elif hasattr(node, "__dict__") and type(node).__module__.startswith("torch.distributed"):
            items = list(vars(node).items())
        else:
            continue
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


def _recipe(data: bytes, stock: bool) -> bytes:
    """A valid record (or stock Metadata) with a few fields replaced, as `data` says."""
    fdp = atheris.FuzzedDataProvider(data)
    doc = pickle.loads(_STOCK_BLOB) if stock else json.loads(_RECORD)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        slots = _slots(doc)
        node, key = slots[fdp.ConsumeIntInRange(0, len(slots) - 1)]
        value = _value(fdp, 0, stock)
        if isinstance(node, (dict, list)):
            node[key] = value
        else:
            setattr(node, key, value)
    try:
        return pickle.dumps(doc) if stock else json.dumps(doc).encode()
    except Exception:  # a value the stock classes' own pickling refuses: no input
        return b""


def _fix_sizes(data: bytes) -> bytes:
    """The record with its rank files' sizes set to the files' real sizes."""
    try:
        doc = json.loads(data)
        for row in doc["files"]:
            if row[0] in RANK_FILES:
                row[1] = os.path.getsize(os.path.join(OURS, row[0]))
        return json.dumps(doc).encode()
    except Exception:
        return data


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    stock = bool(raw[0] & 1)
    data = _recipe(raw[1:], stock) if raw[0] & 4 else raw[1:]
    if stock:
        d, name = STOCK, ".metadata"
    else:
        d, name = OURS, tdcp.METADATA_NAME
        if raw[0] & 2:
            data = _fix_sizes(data)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    out = os.path.join(_ROOT, "out.tf")
    calls = [
        lambda: tdcp.dcp_to_state_dict(d),
        lambda: tdcp.verify_checkpoint(d),
        lambda: tdcp.convert_checkpoint(d, out, "tensorfile"),
        lambda: tdcp.describe_checkpoint(d),
    ]
    if not stock:
        calls.insert(0, lambda: tdcp.read_metadata(d))
    for call in calls:
        try:
            call()
        except FormatError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


build()
_RECORD = json.dumps(record())
with open(os.path.join(STOCK, ".metadata"), "rb") as _f:
    _STOCK_BLOB = _f.read()

if __name__ == "__main__":
    main()
