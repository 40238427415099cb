"""The pure parts of a managed run: step and record names, the commit record and its
parsing, the retention rule, and the checks of the manager's arguments."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import re
from collections.abc import Iterable
from typing import Any

from ._errors import FormatError

RECORD_FORMAT = "tensorfile-manager"
RECORD_VERSION = 2  # 2 added "storages" (incremental saves); version 1 records are read too
LOCK_NAME = ".tensorfile-manager.lock"
MAX_RECORD_NBYTES = 16 << 20
FORMATS = ("tensorfile", "dcp")
_SUFFIX = {"tensorfile": "tf", "dcp": "dcp"}

# step-00000100.json (the commit record) and step-00000100.1a2b3c4d.tf (its data; .dcp for
# a torch.distributed.checkpoint directory). Steps have at least 8 digits, no extra zeros.
RECORD_NAME = re.compile(r"step-([0-9]{8,})\.json\Z")
DATA_NAME = re.compile(r"step-([0-9]{8,})\.[0-9a-f]{8}\.(tf|dcp)\Z")
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def canonical_step(digits: str) -> int | None:
    step = int(digits)
    return step if f"{step:08d}" == digits else None


def record_name(step: int) -> str:
    return f"step-{step:08d}.json"


@dataclasses.dataclass(frozen=True)
class Record:
    """One commit record: what a checkpoint is and where its data lies."""

    step: int
    sequence: int  # commit order within the directory: 1, 2, ...; the newest is the highest
    data: str  # file (format "tensorfile") or directory ("dcp") name beside the record
    kind: str
    nbytes: int | None  # the data file's byte count; None for a directory
    metrics: dict[str, Any]
    metadata: dict[str, str]
    saved_at: float
    # Incremental saves: per storage of the file, [XXH3-128 hex or None, the data file
    # holding its bytes (this one's or an older checkpoint's), storage index there, nbytes,
    # CRC32C]. None for a full save.
    storages: list[list[Any]] | None = None

    def uses(self) -> set[str]:
        """The data files this checkpoint needs: its own and those holding its storages."""
        out = {self.data}
        for row in self.storages or ():
            out.add(row[1])
        return out

    def to_json(self) -> bytes:
        doc = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION}
        doc.update(dataclasses.asdict(self))
        return (json.dumps(doc, allow_nan=True, indent=1) + "\n").encode()


@dataclasses.dataclass
class Entry:
    """A step that has a record file: its parsed record (None if it cannot be read) and
    why it is not a whole checkpoint (None if it is one)."""

    step: int
    record: Record | None
    problem: str | None


# --------------------------------------------------------------------------- retention


def retained(
    checkpoints: Iterable[tuple[int, int, float | None]],
    *,
    keep_last: int | None,
    keep_every: int | None,
    keep_best: int | None,
    mode: str,
) -> set[int]:
    """The steps the retention rule keeps, from (step, sequence, metric value or None)
    triples of the committed checkpoints. A checkpoint is kept if it is among the
    `keep_last` most recently committed, or its step is a multiple of `keep_every`, or it
    is among the `keep_best` by its metric (lowest for mode "min", highest for "max"; ties
    go to the more recent; a checkpoint without a numeric, non-NaN metric is never among
    the best). With all three None everything is kept; the most recent is always kept."""
    rows = list(checkpoints)
    if not rows:
        return set()
    if keep_last is None and keep_every is None and keep_best is None:
        return {step for step, _, _ in rows}
    by_recency = sorted(rows, key=lambda r: r[1], reverse=True)
    keep = {by_recency[0][0]}
    if keep_last:
        keep.update(step for step, _, _ in by_recency[:keep_last])
    if keep_every:
        keep.update(step for step, _, _ in rows if step % keep_every == 0)
    if keep_best:
        sign = 1.0 if mode == "min" else -1.0
        ranked = sorted(
            (r for r in rows if r[2] is not None and not math.isnan(r[2])),
            key=lambda r: (sign * r[2], -r[1]),  # type: ignore[operator]
        )
        keep.update(step for step, _, _ in ranked[:keep_best])
    return keep


def metric_value(metrics: dict[str, Any], metric: str | None) -> float | None:
    value = metrics.get(metric) if metric is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def plain_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics as JSON values: str keys; None, bool, int, float or str values, and
    one-element tensors or numpy scalars turned into numbers with .item()."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(
            f"tensorfile.CheckpointManager.save: metrics must be a dict, got {type(metrics).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise TypeError(f"tensorfile.CheckpointManager.save: metric name {key!r} is not a str")
        if not isinstance(value, (type(None), bool, int, float, str)) and hasattr(value, "item"):
            if getattr(value, "numel", lambda: 1)() != 1:
                raise TypeError(
                    f"tensorfile.CheckpointManager.save: metric {key!r} holds more than one value"
                )
            value = value.item()
        if type(value) not in (type(None), bool, int, float, str):
            raise TypeError(
                f"tensorfile.CheckpointManager.save: metric {key!r} is a "
                f"{type(value).__name__}; metrics are numbers, bools, str or None"
            )
        out[key] = value
    return out


def check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError("tensorfile.CheckpointManager: step must be an int, got bool")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(
            f"tensorfile.CheckpointManager: step must be an int, got {type(step).__name__}"
        ) from None
    if step < 0:
        raise ValueError(f"tensorfile.CheckpointManager: step must be >= 0, got {step}")
    return step


def check_count(name: str, value: Any, least: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"tensorfile.CheckpointManager: {name} must be None or an int >= {least}, got {value!r}"
        )
    return value


# --------------------------------------------------------------------------- records


def parse_record(blob: bytes, where: str, step: int) -> Record:
    """Checks a commit record completely; raises FormatError naming `where`."""
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e}); the commit record is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        raise FormatError(f"{where}: not a tensorfile checkpoint manager record")
    if doc.get("format_version") not in (1, RECORD_VERSION):
        raise FormatError(
            f"{where}: record format version {doc.get('format_version')!r}; this tensorfile "
            f"reads version {RECORD_VERSION} (upgrade tensorfile to read it)"
        )

    def field(name: str, types: tuple[type, ...]) -> Any:
        value = doc.get(name)
        if type(value) not in types:
            raise FormatError(f"{where}: field {name!r} is missing or has the wrong type")
        return value

    kind = field("kind", (str,))
    data = field("data", (str,))
    nbytes = field("nbytes", (int, type(None)))
    metrics = field("metrics", (dict,))
    metadata = field("metadata", (dict,))
    m = DATA_NAME.match(data)
    if field("step", (int,)) != step:
        raise FormatError(f"{where}: records step {doc['step']}, its name says {step}")
    if kind not in FORMATS or m is None or canonical_step(m[1]) != step or m[2] != _SUFFIX[kind]:
        # Only names of this form are accepted, so a record can never point outside its
        # directory.
        raise FormatError(f"{where}: data name {data!r} is not a {kind!r} name for step {step}")
    if (kind == "tensorfile") != (nbytes is not None) or (nbytes is not None and nbytes < 0):
        raise FormatError(f"{where}: byte count {nbytes!r} does not fit a {kind!r} checkpoint")
    sequence = field("sequence", (int,))
    if sequence < 1:
        raise FormatError(f"{where}: sequence {sequence} is not positive")
    if not all(type(v) in (type(None), bool, int, float, str) for v in metrics.values()):
        raise FormatError(f"{where}: metrics hold a value that is not a number, bool, str or null")
    if not all(type(v) is str for v in metadata.values()):
        raise FormatError(f"{where}: metadata values must be strings")
    saved_at = field("saved_at", (float, int))
    storages = doc.get("storages")
    if storages is not None:
        if kind != "tensorfile" or type(storages) is not list:
            raise FormatError(f"{where}: field 'storages' does not fit a {kind!r} checkpoint")
        for i, row in enumerate(storages):
            if not _storage_row_ok(row):
                raise FormatError(
                    f"{where}: storage {i} is not [digest, data name, index, nbytes, crc]"
                )
    return Record(step, sequence, data, kind, nbytes, metrics, metadata, float(saved_at), storages)


def _storage_row_ok(row: Any) -> bool:
    if type(row) is not list or len(row) != 5:
        return False
    digest, holder, index, nbytes, crc = row
    return (
        (
            digest is None
            or (type(digest) is str and re.fullmatch(r"[0-9a-f]{32}", digest) is not None)
        )
        and type(holder) is str
        and (m := DATA_NAME.match(holder)) is not None
        and m[2] == "tf"
        and all(type(v) is int and v >= 0 for v in (index, nbytes, crc))
        and crc < 2**32
    )
