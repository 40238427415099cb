"""Object graph <-> JSON-ready tree with flat tensor leaves, and the tensors' key paths.

Every node is one of: JSON null/true/false, a string, an int of at most 53 bits, a
finite float, or a list whose first item is a tag naming the type (see docs/format.md,
"The object tree"). Tensors and arrays become ["tensor", i] / ["ndarray", i], indexes
into the flat leaf list; the same object twice becomes the same index twice.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import gc
import math
import operator
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _engine
from ._dtypes import NUMPY_ITEMSIZE, TORCH_DTYPE_VALUES, numpy_name
from ._errors import FormatError

MAX_DEPTH = 200  # containers nested deeper than this are refused on save and on load
_SAFE_INT = 2**53

_KEY_TYPES = (int, float, bool, type(None), complex, bytes, tuple)


# JSON \u escapes cannot tell a lone surrogate pair ("\ud83d\ude00", two code points)
# from the character it would encode, so strings holding surrogates are written as hex.
SURROGATE = re.compile("[\ud800-\udfff]")


def _str_node(s: str) -> list[str]:
    return ["str", s.encode("utf-8", "surrogatepass").hex()]


def _float_node(x: float) -> Any:
    if math.isfinite(x):
        return x
    return ["float", "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")]


def _torch_module() -> Any:
    return sys.modules.get("torch")


def path_str(path: list[Any]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


class _LeafPaths:
    """The key path of each leaf, for error messages: `paths[i]` is a list of keys.
    Runs of leaves under one dict are kept as (prefix, keys), so a state dict of many
    tensors costs no list per tensor unless a message asks for one."""

    def __init__(self) -> None:
        self._one: dict[int, list[Any]] = {}
        self._runs: list[tuple[int, list[Any], list[Any]]] = []  # (first leaf, prefix, keys)

    def add(self, index: int, path: list[Any]) -> None:
        self._one[index] = list(path)

    def add_run(self, start: int, prefix: list[Any], keys: list[Any]) -> None:
        self._runs.append((start, list(prefix), keys))

    def __getitem__(self, index: int) -> list[Any]:
        path = self._one.get(index)
        if path is not None:
            return path
        for start, prefix, keys in self._runs:
            if start <= index < start + len(keys):
                return [*prefix, keys[index - start]]
        raise IndexError(index)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector: planning and building allocate one small
    object per tensor and create no cycles, and with 20,000 tensors the collector's
    repeated passes cost more than the work itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Flattener:
    """Walks an object once, producing the tree and the leaf list (tensors and arrays)."""

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.leaf_paths = _LeafPaths()
        self._leaf_index: dict[int, int] = {}  # id(leaf) -> index; see _index()
        self._unindexed: list[tuple[list[Any], int]] = []  # runs of (leaves, first index)
        self._active: set[int] = set()
        self._path: list[Any] = []
        self._in_key = False
        torch = _torch_module()
        self._tensor_type = torch.Tensor if torch is not None else None
        self._torch = torch

    def error(self, message: str) -> TypeError:
        return TypeError(
            f"tensorfile.save: cannot save the object at key path {path_str(self._path)!r}: {message}"
        )

    def flatten(self, obj: Any) -> Any:
        return self._node(obj, 0)

    def _index(self) -> dict[int, int]:
        """id(leaf) -> leaf index. Runs of a tensor dict's leaves enter it only when a
        later leaf is looked up, so a plain state dict never builds it."""
        for values, start in self._unindexed:
            self._leaf_index.update(zip(map(id, values), range(start, start + len(values))))
        self._unindexed.clear()
        return self._leaf_index

    def _leaf(self, obj: Any, tag: str) -> list[Any]:
        if self._in_key:
            raise self.error("a tensor or array inside a dict key is not supported")
        key = id(obj)
        index = self._index().get(key)
        if index is None:
            index = len(self.leaves)
            self._leaf_index[key] = index
            self.leaves.append(obj)
            self.leaf_paths.add(index, self._path)
        return [tag, index]

    def _children(
        self, tag: str, items: Any, depth: int, head: list[Any] | None = None
    ) -> list[Any]:
        out = [tag] if head is None else [tag, *head]
        path = self._path
        for i, item in enumerate(items):
            path.append(i)
            out.append(self._node(item, depth + 1))
            path.pop()
        return out

    def _dict(
        self, tag: str, obj: dict[Any, Any], depth: int, head: list[Any] | None = None
    ) -> list[Any]:
        out = [tag] if head is None else [tag, *head]
        if len(obj) > 1 and self._tensor_dict(obj, out):
            return out
        path = self._path
        for k, v in obj.items():
            path.append(k)
            out.append(self._key(k, depth + 1))
            out.append(self._node(v, depth + 1))
            path.pop()
        return out

    def _tensor_dict(self, obj: dict[Any, Any], out: list[Any]) -> bool:
        """The common state dict, ASCII names to tensors not seen before, in one pass of
        the engine instead of a walk per item; returns False (having done nothing) when
        `obj` is anything else."""
        if self._torch is None:
            return False
        values = list(obj.values())
        start = len(self.leaves)
        items = _engine.tensor_dict_items(
            list(obj), values, self._torch.Tensor, self._torch.nn.Parameter, start
        )
        if items is None:
            return False
        if start and any(map(self._index().__contains__, map(id, values))):
            return False  # shared tensors: the walk below assigns their indexes
        self._unindexed.append((values, start))
        self.leaves += values
        self.leaf_paths.add_run(start, self._path, items[::2])
        out += items
        return True

    def _key(self, k: Any, depth: int) -> Any:
        if type(k) is str:
            return k if k.isascii() or SURROGATE.search(k) is None else _str_node(k)
        if (
            type(k) not in _KEY_TYPES
            and not isinstance(k, np.generic)
            and type(k).__module__ != "torch"
        ):
            raise self.error(f"dict keys of type {type(k).__qualname__} are not supported")
        self._in_key = True
        try:
            return self._node(k, depth)
        finally:
            self._in_key = False

    def _node(self, obj: Any, depth: int) -> Any:
        t = type(obj)
        if t is str:
            return obj if obj.isascii() or SURROGATE.search(obj) is None else _str_node(obj)
        if obj is None or t is bool:
            return obj
        if t is int:
            if -_SAFE_INT <= obj <= _SAFE_INT:
                return obj
            try:
                digits = str(obj)
            except ValueError:  # beyond Python's int-to-str limit (4300 digits)
                digits = ""
            if not digits or len(digits) > 4000:
                raise self.error("ints longer than 4000 characters are not supported")
            return ["int", digits]
        if t is float:
            return _float_node(obj)
        if self._tensor_type is not None and isinstance(obj, self._tensor_type):
            return self._leaf(obj, "tensor")
        if t is np.ndarray:
            return self._leaf(obj, "ndarray")
        if depth >= MAX_DEPTH:
            raise self.error(f"containers are nested more than {MAX_DEPTH} deep")
        if t in (dict, list, tuple, collections.OrderedDict):
            key = id(obj)
            if key in self._active:
                raise self.error("the object contains itself (a reference cycle)")
            self._active.add(key)
            try:
                if t is dict:
                    return self._dict("dict", obj, depth)
                if t is list:
                    return self._children("list", obj, depth)
                if t is tuple:
                    return self._children("tuple", obj, depth)
                attrs = getattr(obj, "__dict__", None) or None
                if attrs is not None:
                    bad = [
                        a
                        for a in attrs
                        if type(a) is not str or a.startswith("__") or not a.isidentifier()
                    ]
                    if bad:
                        raise self.error(f"OrderedDict attribute {bad[0]!r} cannot be saved")
                    self._path.append("@attrs")
                    attrs_node = self._dict("dict", attrs, depth + 1)
                    self._path.pop()
                else:
                    attrs_node = None
                return self._dict("odict", obj, depth, [attrs_node])
            finally:
                self._active.discard(key)
        if t is complex:
            return ["complex", _float_node(obj.real), _float_node(obj.imag)]
        if t is bytes:
            return ["bytes", base64.b64encode(obj).decode("ascii")]
        if t is bytearray:
            return ["bytearray", base64.b64encode(bytes(obj)).decode("ascii")]
        if isinstance(obj, np.generic) and not isinstance(obj, np.ndarray):
            name = numpy_name(obj.dtype)
            if name is None:
                raise self.error(f"numpy scalar of dtype {obj.dtype} is not supported")
            return ["npscalar", name, obj.tobytes().hex()]
        torch = self._torch
        if torch is not None:
            if t is torch.dtype:
                name = str(obj).removeprefix("torch.")
                if name not in TORCH_DTYPE_VALUES:
                    raise self.error(f"dtype value {obj} is not supported")
                return ["dtype", name]
            if t is torch.Size:
                return ["size", *(int(d) for d in obj)]
            if t is torch.device:
                if not valid_device_string(str(obj)):
                    raise self.error(f"device value {obj} is not supported")
                return ["device", str(obj)]
        raise self.error(
            f"objects of type {t.__module__}.{t.__qualname__} are not supported "
            "(tensorfile saves tensors, arrays, dict/list/tuple/OrderedDict and plain values; "
            "there is no pickle)"
            + (
                "; save its state_dict() instead and restore it with load_state_dict()"
                if callable(getattr(obj, "state_dict", None))
                else ""
            )
        )


def _bad(message: str) -> FormatError:
    return FormatError(f"invalid object tree: {message}")


def _decode_float(node: Any) -> float:
    if type(node) is float:
        if not math.isfinite(node):
            raise _bad("plain floats must be finite")
        return node
    if (
        type(node) is list
        and len(node) == 2
        and node[0] == "float"
        and node[1] in ("nan", "inf", "-inf")
    ):
        return float(node[1])
    raise _bad(f"expected a float, got {node!r:.80}")


def _b64(s: Any) -> bytes:
    if type(s) is not str:
        raise _bad("bytes payload must be a base64 string")
    try:
        out = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise _bad(f"bad base64 in bytes payload: {e}") from None
    if base64.b64encode(out).decode("ascii") != s:
        raise _bad("bytes payload is not canonical base64")
    return out


class Builder:
    """Rebuilds objects from a validated tree; `leaf(tag, index)` supplies tensors."""

    def __init__(self, leaf: Callable[[str, int], Any], leaves: list[Any] | None = None) -> None:
        """`leaf(tag, i)` supplies leaf i; `leaves`, when given, holds them all already
        (leaves[i] is leaf(tag, i)), which lets dicts of leaves be built in C-level
        passes."""
        self._leaf = leaf
        self._leaves = leaves

    def build(self, node: Any, depth: int = 0) -> Any:
        t = type(node)
        if t is not list:
            return node  # validate() guarantees only JSON scalars get here
        tag = node[0]
        if tag == "tensor" or tag == "ndarray":
            return self._leaf(tag, node[1])
        if tag == "list":
            return [self.build(c, depth + 1) for c in node[1:]]
        if tag == "tuple":
            return tuple(self.build(c, depth + 1) for c in node[1:])
        if tag == "dict":
            if self._leaves is not None and len(node) > 3:
                keys, values = node[1::2], node[2::2]
                if (
                    set(map(type, keys)) == {str}
                    and set(map(type, values)) == {list}
                    and set(map(_first, values)) <= _LEAF_TAGS
                ):
                    return dict(zip(keys, map(self._leaves.__getitem__, map(_second, values))))
            return {
                self.build(node[i], depth + 1): self.build(node[i + 1], depth + 1)
                for i in range(1, len(node), 2)
            }
        if tag == "odict":
            out: collections.OrderedDict[Any, Any] = collections.OrderedDict(
                (self.build(node[i], depth + 1), self.build(node[i + 1], depth + 1))
                for i in range(2, len(node), 2)
            )
            if node[1] is not None:
                for name, value in self.build(node[1], depth + 1).items():
                    setattr(out, name, value)
            return out
        return decode_scalar(node)


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_LEAF_TAGS = {"tensor", "ndarray"}


def decode_scalar(node: list[Any]) -> Any:
    tag = node[0]
    if tag == "str":
        return bytes.fromhex(node[1]).decode("utf-8", "surrogatepass")
    if tag == "int":
        return int(node[1])
    if tag == "float":
        return float(node[1])
    if tag == "complex":
        return complex(_decode_float(node[1]), _decode_float(node[2]))
    if tag == "bytes":
        return _b64(node[1])
    if tag == "bytearray":
        return bytearray(_b64(node[1]))
    if tag == "npscalar":
        return np.frombuffer(bytes.fromhex(node[2]), dtype=np.dtype(node[1]).newbyteorder("<"))[
            0
        ].copy()
    torch = _torch_module()
    if torch is None:
        import torch  # the file holds torch values: loading them needs torch
    if tag == "dtype":
        return getattr(torch, node[1])
    if tag == "size":
        return torch.Size(node[1:])
    if tag == "device":
        return torch.device(node[1])
    raise _bad(f"unknown tag {tag!r:.40}")


def validate(
    tree: Any, ntensors: int, kinds: list[str], *, _depth: int = 0, _in_key: bool = False
) -> list[int]:
    """Checks every node of a decoded tree (types, tags, arities, leaf indexes, dict key
    uniqueness) without building anything; returns the leaf indexes in tree order.
    `kinds[i]` is "torch" or "numpy" for tensor row i."""
    order: list[int] = []
    stack: list[tuple[Any, int, bool]] = [(tree, _depth, _in_key)]
    while stack:
        node, depth, in_key = stack.pop()
        t = type(node)
        if node is None or t is bool or t is str:
            continue
        if t is int:
            if not -_SAFE_INT <= node <= _SAFE_INT:
                raise _bad(
                    'plain ints must fit in 53 bits; larger ones are written as ["int", "digits"]'
                )
            continue
        if t is float:
            if not math.isfinite(node):
                raise _bad('plain floats must be finite; nan and inf are written as ["float", ...]')
            continue
        if t is not list or not node or type(node[0]) is not str:
            raise _bad(f"unexpected node {node!r:.80}")
        if depth > MAX_DEPTH:
            raise _bad(f"containers nested more than {MAX_DEPTH} deep")
        tag = node[0]
        n = len(node)
        if in_key and tag not in _KEY_TAGS:
            raise _bad(f"a {tag} node cannot be a dict key")
        if tag in ("tensor", "ndarray"):
            if n != 2 or type(node[1]) is not int or not 0 <= node[1] < ntensors:
                raise _bad(f"bad {tag} reference {node!r:.80}")
            want = "torch" if tag == "tensor" else "numpy"
            if kinds[node[1]] != want:
                raise _bad(f"{tag} reference {node[1]} points at a {kinds[node[1]]} row")
            order.append(node[1])
        elif tag in ("list", "tuple"):
            stack.extend((c, depth + 1, in_key) for c in reversed(node[1:]))
        elif tag in ("dict", "odict"):
            first = 1 if tag == "dict" else 2
            if tag == "odict":
                if n < 2:
                    raise _bad("odict node without its attribute slot")
                attrs = node[1]
                if attrs is not None:
                    if type(attrs) is not list or not attrs or attrs[0] != "dict":
                        raise _bad("odict attributes must be null or a dict node")
                    names = attrs[1::2]
                    if any(
                        type(a) is not str or a.startswith("__") or not a.isidentifier()
                        for a in names
                    ):
                        raise _bad("odict attribute names must be strings not starting with '__'")
                    stack.append((attrs, depth + 1, False))
            if (n - first) % 2:
                raise _bad(f"{tag} node with an odd number of key/value items")
            keys = node[first::2]
            for k in keys:
                _check_key(k, depth + 1)
            try:
                hashed = {_key_identity(k) for k in keys}
            except Exception:
                raise _bad(f"malformed or unhashable dict key in {node!r:.80}") from None
            if len(hashed) != len(keys):
                raise _bad("duplicate dict key")
            for i in range(n - 1, first, -2):
                stack.append((node[i], depth + 1, False))
        elif tag == "int":
            if (
                n != 2
                or type(node[1]) is not str
                or len(node[1]) > 4000
                or not _INT_RE.fullmatch(node[1])
            ):
                raise _bad(
                    f"bad int node {node!r:.80} (want a canonical decimal of at most 4000 digits)"
                )
            if -_SAFE_INT <= int(node[1]) <= _SAFE_INT:
                raise _bad("ints that fit in 53 bits must be written as plain JSON numbers")
        elif tag == "str":
            if (
                n != 2
                or type(node[1]) is not str
                or len(node[1]) % 2
                or not _HEX_RE.fullmatch(node[1])
            ):
                raise _bad("a str node holds lowercase hex")
            try:
                text = bytes.fromhex(node[1]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise _bad("a str node must hold UTF-8 (surrogates allowed)") from None
            if SURROGATE.search(text) is None:
                raise _bad(
                    "str nodes are only for strings with surrogates; others are plain JSON strings"
                )
        elif tag == "float":
            if n != 2 or node[1] not in ("nan", "inf", "-inf"):
                raise _bad(f"bad float node {node!r:.80}")
        elif tag == "complex":
            if n != 3:
                raise _bad("complex node needs two parts")
            _decode_float(node[1])
            _decode_float(node[2])
        elif tag in ("bytes", "bytearray"):
            if n != 2:
                raise _bad(f"bad {tag} node")
            _b64(node[1])
        elif tag == "npscalar":
            if (
                n != 3
                or type(node[1]) is not str
                or node[1] not in NUMPY_ITEMSIZE
                or type(node[2]) is not str
            ):
                raise _bad(f"bad npscalar node {node!r:.80}")
            if len(node[2]) != 2 * NUMPY_ITEMSIZE[node[1]] or not _HEX_RE.fullmatch(node[2]):
                raise _bad("npscalar payload must be lowercase hex of the dtype's width")
            if node[1] == "bool" and node[2] not in ("00", "01"):
                raise _bad("a bool npscalar must be 00 or 01")
        elif tag == "dtype":
            if n != 2 or type(node[1]) is not str or node[1] not in TORCH_DTYPE_VALUES:
                raise _bad(f"unknown torch dtype {node[1:]!r:.80}")
        elif tag == "size":
            if any(type(d) is not int or not 0 <= d < 2**63 for d in node[1:]):
                raise _bad("torch.Size entries must be ints in [0, 2^63)")
        elif tag == "device":
            if n != 2 or type(node[1]) is not str or not valid_device_string(node[1]):
                raise _bad(f"bad device {node[1:]!r:.80}")
        else:
            raise _bad(f"unknown tag {tag!r:.40}")
    return order


_MARK = object()
_INT_RE = re.compile(r"-?[1-9][0-9]*")
_HEX_RE = re.compile(r"[0-9a-f]*")
_KEY_TAGS = (
    "str",
    "tuple",
    "int",
    "float",
    "complex",
    "bytes",
    "npscalar",
    "dtype",
    "size",
    "device",
)


def _check_key(k: Any, depth: int) -> None:
    """Validates a dict key node fully (a key may hold only plain values) so that
    _key_identity can rebuild it safely."""
    validate(k, 0, [], _depth=depth, _in_key=True)


def _key_identity(k: Any) -> Any:
    """A hashable stand-in for a dict key node that equals another iff the rebuilt keys
    would be equal (1, 1.0, True and numpy's 1 collide in a Python dict, and so here)."""
    if type(k) is list:
        tag = k[0]
        if tag == "tuple":
            return tuple(_key_identity(c) for c in k[1:])
        if tag == "size":
            return tuple(k[1:])  # torch.Size equals the tuple of its entries
        if tag == "float" and k[1] == "nan":
            return ("nan", id(k))  # nan != nan: two nan keys never collide
        if tag in ("dtype", "device"):
            return (_MARK, tag, k[1])  # _MARK keeps them apart from any user tuple
        return decode_scalar(k)
    return k


# torch's device types (c10/core/DeviceType.h), each optionally followed by ":index".
_DEVICE_TYPES = "cpu|cuda|ipu|xpu|mkldnn|opengl|opencl|ideep|hip|ve|fpga|maia|xla|lazy|vulkan|mps|meta|hpu|mtia|privateuseone"
_DEVICE_RE = re.compile(rf"(?:{_DEVICE_TYPES})(?::(?:0|[1-9][0-9]{{0,4}}))?")


def valid_device_string(s: str) -> bool:
    """A torch device string: a known device type, optionally ':' and an index."""
    return _DEVICE_RE.fullmatch(s) is not None


def key_index(tree: Any) -> tuple[dict[str, int], set[str]]:
    """{key path: tensor index} for every reference to a tensor, in tree order, and the
    paths that name more than one tensor (e.g. {"a.b": t1, "a": {"b": t2}}; the first
    keeps the path). A tensor reached by two paths is listed under both. Dict keys (str()
    of non-string keys) and list positions join with "."; OrderedDict attributes are not
    walked. Recursion depth is bounded by the format's nesting limit."""
    keys: dict[str, int] = {}
    ambiguous: set[str] = set()

    def walk(node: list[Any], prefix: str) -> None:
        tag = node[0]
        if tag == "dict" or tag == "odict":
            first = 1 if tag == "dict" else 2
            names: Any = node[first::2]
            children = node[first + 1 :: 2]
        elif tag == "list" or tag == "tuple":
            names = map(str, range(len(node) - 1))
            children = node[1:]
        else:
            return
        for name, child in zip(names, children):
            if type(child) is not list:
                continue
            if type(name) is not str:
                name = str(decode_key_for_path(name))
            path = f"{prefix}.{name}" if prefix else name
            ctag = child[0]
            if ctag == "tensor" or ctag == "ndarray":
                if keys.setdefault(path, child[1]) != child[1]:
                    ambiguous.add(path)
            else:
                walk(child, path)

    if type(tree) is list:
        if tree[0] in ("tensor", "ndarray"):
            keys[""] = tree[1]
        else:
            walk(tree, "")
    return keys, ambiguous


def decode_key_for_path(k: Any) -> Any:
    if type(k) is list:
        if k[0] == "tuple":
            return tuple(decode_key_for_path(c) for c in k[1:])
        try:
            return decode_scalar(k)
        except Exception:
            return k
    return k


def tensor_paths(obj: Any, is_tensor: Callable[[Any], bool]) -> dict[str, Any]:
    """{key path: leaf} for every leaf of nested dicts, lists and tuples that `is_tensor`
    accepts, with the key paths `key_index` gives a file's tree (str() of non-string dict
    keys, list positions, joined with "."). Nesting is bounded as in a save."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"containers are nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            return
        for k, v in items:
            name = k if type(k) is str else str(k)
            path = f"{prefix}.{name}" if prefix else name
            if is_tensor(v):
                out[path] = v
            else:
                walk(v, path, depth + 1)

    if is_tensor(obj):
        out[""] = obj
    else:
        walk(obj, "", 0)
    return out
