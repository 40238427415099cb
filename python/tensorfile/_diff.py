"""Diffs of two files of any readable formats, value by value along the object tree, with
one tensor pair in memory at a time."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _config
from ._convert import Progress, flatten_tensors, no_progress, placeholders
from ._reader import Reader, open_reader
from .formats import FLAG_PARAMETER, FLAG_REQUIRES_GRAD

MAX_DIFF_VALUES = 1_000_000  # per side: a pickle's shared containers can repeat a subtree


class _Side:
    """One side of a diff: a file opened lazily (tensors read one at a time), or a DCP
    directory read whole."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: Reader | None = None
        self.state: Any = None
        self.flat: dict[str, Any] = {}
        if os.path.isdir(path):
            from . import dcp

            self.state = dcp.dcp_to_state_dict(path)
            self.flat, _ = flatten_tensors(self.state)
            self.keys = list(self.flat)
        else:
            self.reader = open_reader(path, True)
            self.keys = list(self.reader.key_index())

    def describe(self, key: str) -> tuple[str, list[int]]:
        if self.reader is None:
            t = self.flat[key]
            return str(t.dtype).removeprefix("torch."), list(t.shape)
        row = self.reader.layout.tensors[self.reader.key_index()[key]]
        return row.dtype, list(row.shape)

    def get(self, key: str) -> Any:
        if self.reader is None:
            return self.flat[key]
        if key in self.reader.ambiguous:
            raise ValueError(f"{self.reader.name}: key path {key!r} names more than one tensor")
        return self.tensor(self.reader.key_index()[key])

    def tensor(self, i: int) -> Any:
        """Tensor row i, read (its storage only) and checked, on the CPU."""
        assert self.reader is not None
        s = self.reader.layout.tensors[i].storage
        storages = self.reader.read_storages([s], "cpu", True, _config.num_threads(), False)
        return self.reader.build_tensor(i, storages)

    def graph(self) -> tuple[Any, dict[int, int]]:
        """The whole object graph, tensors as stand-ins, and {id(stand-in): tensor row}
        (empty for a DCP directory, whose tensors are in memory)."""
        if self.reader is None:
            return self.state, {}
        self.reader.key_index()  # before the stand-ins take the place of the records
        graph, stand = placeholders(self.reader)
        self._stand = stand  # keeps the ids in the map unique
        return graph, {id(t): i for i, t in enumerate(stand)}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| over elements, in float64 (complex: modulus), read in bounded chunks;
    two NaNs in the same place count as equal, a NaN against a number as inf."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().resolve_conj().resolve_neg().reshape(-1)
        b = b.detach().resolve_conj().resolve_neg().reshape(-1)
        cast = torch.complex128 if a.is_complex() else torch.float64
        worst = 0.0
        for k in range(0, a.numel(), 1 << 22):
            x, y = a[k : k + (1 << 22)].to(cast), b[k : k + (1 << 22)].to(cast)
            d = (x - y).abs()
            both = (
                torch.isnan(x) & torch.isnan(y)
                if not a.is_complex()
                else torch.isnan(x.abs()) & torch.isnan(y.abs())
            )
            d = torch.where(both, torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf))
            if d.numel():
                worst = max(worst, float(d.max()))
        return worst
    x = np.asarray(a).reshape(-1)
    y = np.asarray(b).reshape(-1)
    worst = 0.0
    for k in range(0, x.size, 1 << 22):
        xs = x[k : k + (1 << 22)].astype(np.complex128 if np.iscomplexobj(x) else np.float64)
        ys = y[k : k + (1 << 22)].astype(xs.dtype)
        d = np.abs(xs - ys)
        both = np.isnan(np.abs(xs)) & np.isnan(np.abs(ys))
        d = np.where(both, 0.0, np.nan_to_num(d, nan=math.inf))
        if d.size:
            worst = max(worst, float(d.max()))
    return worst


def diff(
    path_a: str, path_b: str, progress: Progress = no_progress, *, tensors_only: bool = False
) -> dict[str, Any]:
    """Compares two files (any formats, or DCP directories) by key path, reading one
    tensor pair at a time: values only in one (`only_in_a`, `only_in_b`), tensors whose
    dtype or shape changed (`changed`), the max absolute difference of each common tensor
    (`max_abs_diff`), and every other difference (`values`: plain values, types,
    container kinds). `tensors_only` compares the tensors alone, as `keys()` lists them."""
    a, b = _Side(path_a), _Side(path_b)
    try:
        if tensors_only:
            report = _diff_tensors(a, b, progress)
        else:
            report = _diff_all(a, b, progress)
        report["identical"] = not (
            report["only_in_a"]
            or report["only_in_b"]
            or report["changed"]
            or report["values"]
            or any(v != 0 for v in report["max_abs_diff"].values())
        )
        return report
    finally:
        a.close()
        b.close()


def _diff_tensors(a: _Side, b: _Side, progress: Progress) -> dict[str, Any]:
    keys_b = set(b.keys)
    keys_a = set(a.keys)
    report: dict[str, Any] = {
        "only_in_a": [k for k in a.keys if k not in keys_b],
        "only_in_b": [k for k in b.keys if k not in keys_a],
        "changed": [],
        "max_abs_diff": {},
        "values": [],
    }
    for key in a.keys:
        if key not in keys_b:
            continue
        da, db = a.describe(key), b.describe(key)
        if da != db:
            report["changed"].append({"key": key, "a": da, "b": db})
        elif 0 not in da[1] or not da[1]:
            report["max_abs_diff"][key] = _max_abs_diff(a.get(key), b.get(key))
        else:
            report["max_abs_diff"][key] = 0.0
        progress(1)
    return report


class _Entry(NamedTuple):
    """One value of a graph, at its key path: a tensor (its stand-in or, for a DCP side,
    itself), a container with children (`value` is the container), or any other value."""

    what: str  # "tensor", "container" or "value"
    value: Any
    parent: str | None  # the key path of the enclosing container


_EXIT = object()  # marks the end of a container's children on the walk's stack


def _entries(side: _Side) -> dict[str, _Entry]:
    """{key path: entry} of every value reachable from the side's root, in order. Keys
    join with "." as in keys(), OrderedDict attributes with "@"; a container reached
    again inside itself is a value ("<cycle>"), so the walk ends."""
    graph, rows = side.graph()
    torch = sys.modules.get("torch")
    tensor_types: tuple[type, ...] = (np.ndarray,) if torch is None else (np.ndarray, torch.Tensor)
    out: dict[str, _Entry] = {}
    active: set[int] = set()
    stack: list[tuple[Any, str, Any]] = [(graph, "", None)]
    while stack:
        node, path, parent = stack.pop()
        if parent is _EXIT:  # leaving a container
            active.discard(node)
            continue
        while path in out:  # a path spelled twice ({"a.b": 1, "a": {"b": 2}})
            path += "'"
        if len(out) >= MAX_DIFF_VALUES:
            raise ValueError(
                f"{side.path}: more than {MAX_DIFF_VALUES:,} values to compare (containers "
                "shared many times over); compare with --tensors-only"
            )
        if isinstance(node, tensor_types):
            out[path] = _Entry("tensor", rows.get(id(node), node), parent)
            continue
        children: list[tuple[str, Any]] = []
        if isinstance(node, dict):
            children = [(str(k), v) for k, v in node.items()]
            attrs = getattr(node, "__dict__", None)
            if attrs:
                children += [(f"@{k}", v) for k, v in attrs.items()]
        elif type(node) in (list, tuple):
            children = [(str(i), v) for i, v in enumerate(node)]
        if not children:
            out[path] = _Entry("value", node, parent)
            continue
        if id(node) in active:
            out[path] = _Entry("value", "<cycle>", parent)
            continue
        out[path] = _Entry("container", node, parent)
        active.add(id(node))
        stack.append((id(node), "", _EXIT))
        for name, child in reversed(children):
            sep = "" if not path or name.startswith("@") else "."
            stack.append((child, f"{path}{sep}{name}", path))
    return out


def _same_value(x: Any, y: Any) -> bool:
    """Type-exact equality of plain values (nan equals nan; containers item by item)."""
    if type(x) is not type(y):
        return False
    if isinstance(x, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, complex):
        return _same_value(x.real, y.real) and _same_value(x.imag, y.imag)
    if isinstance(x, dict):
        return list(x) == list(y) and all(_same_value(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same_value(p, q) for p, q in zip(x, y))
    try:
        return bool(x == y)
    except Exception:  # values whose == cannot answer (numpy arrays in a set, say)
        return x is y


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_all(a: _Side, b: _Side, progress: Progress) -> dict[str, Any]:
    ea, eb = _entries(a), _entries(b)
    report: dict[str, Any] = {
        "only_in_a": _only_in(ea, eb),
        "only_in_b": _only_in(eb, ea),
        "changed": [],
        "max_abs_diff": {},
        "values": [],
    }
    for path, x in ea.items():
        y = eb.get(path)
        if y is None:
            continue
        label = path or "<root>"
        if x.what == "tensor" and y.what == "tensor":
            ta, tb = _tensor_facts(a, x.value), _tensor_facts(b, y.value)
            if ta[:2] != tb[:2]:
                report["changed"].append({"key": label, "a": list(ta[:2]), "b": list(tb[:2])})
            elif ta[2] != tb[2]:
                report["values"].append({"key": label, "a": _describe(a, x), "b": _describe(b, y)})
            elif 0 in ta[1] and ta[1]:
                report["max_abs_diff"][label] = 0.0
            else:
                report["max_abs_diff"][label] = _max_abs_diff(_read(a, x.value), _read(b, y.value))
            progress(1)
        elif x.what == "container" and y.what == "container":
            if type(x.value) is not type(y.value):
                report["values"].append({"key": label, "a": _describe(a, x), "b": _describe(b, y)})
        elif x.what != y.what or not _same_value(x.value, y.value):
            report["values"].append({"key": label, "a": _describe(a, x), "b": _describe(b, y)})
    return report


def _only_in(ours: dict[str, _Entry], theirs: dict[str, _Entry]) -> list[str]:
    """Key paths of the values (tensors, plain values, empty containers) in `ours` and
    not in `theirs`; where the other side has nothing at all under a container, the
    container's path stands for all of it."""
    under: set[str] = set()  # every path of theirs and every prefix it continues
    for p in theirs:
        under.add(p)
        for i, c in enumerate(p):
            if c in ".@":
                under.add(p[:i])
    out: list[str] = []
    shown: set[str] = set()
    for path, e in ours.items():
        if e.what == "container" or path in theirs:
            continue
        top, parent = path, e.parent
        while parent and parent not in under:  # the root ("") is never shown for all
            top, parent = parent, ours[parent].parent
        if top not in shown:
            shown.add(top)
            out.append(top or "<root>")
    return out


def _tensor_facts(side: _Side, ref: Any) -> tuple[str, list[int], str]:
    """(dtype, shape, kind and flags) of a tensor entry: a row index or a tensor."""
    if isinstance(ref, int):
        assert side.reader is not None
        row = side.reader.layout.tensors[ref]
        kind = row.kind
        if row.flags & FLAG_PARAMETER:
            kind += " Parameter"
        if row.flags & FLAG_REQUIRES_GRAD:
            kind += " requiring grad"
        return row.dtype, list(row.shape), kind
    if isinstance(ref, np.ndarray):
        return str(ref.dtype), list(ref.shape), "numpy"
    kind = "torch"
    if type(ref).__name__ == "Parameter":
        kind += " Parameter"
    if ref.requires_grad:
        kind += " requiring grad"
    return str(ref.dtype).removeprefix("torch."), list(ref.shape), kind


def _read(side: _Side, ref: Any) -> Any:
    return side.tensor(ref) if isinstance(ref, int) else ref


def _describe(side: _Side, e: _Entry) -> str:
    if e.what == "tensor":
        dtype, shape, kind = _tensor_facts(side, e.value)
        return f"{kind} {dtype}[{','.join(map(str, shape))}]"
    name = type(e.value).__name__
    if e.what == "container":
        return f"{name} of {len(e.value)}"
    return f"{name} {_short(e.value)}"
