"""The restricted unpickler of torch.save files' data.pkl: it resolves only the globals
torch.load(weights_only=True) allows for tensors and plain containers, each to a stand-in
of tensorfile's own (nothing from the file is imported or called), keeps its memo in a
dict and bounds nesting, so its cost is proportional to the pickle's size."""

from __future__ import annotations

import codecs
import collections
import math
import pickle
import struct
from typing import Any

from .._dtypes import TORCH_ITEMSIZE
from .._errors import FormatError
from .._tree import no_gc

MAX_DEPTH = 200
MAX_NDIM = 64


_STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "UntypedStorage": "uint8",
}
_QUANTIZED_STORAGES = {
    "QInt8Storage",
    "QInt32Storage",
    "QUInt8Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
}


class _Inert:
    """Base of the stand-ins the unpickler hands to the pickle: slotted, and a BUILD
    opcode aimed at one (to rewrite its fields) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"the pickle tries to set state on a {type(self).__name__}")


class StorageType(_Inert):
    """What a `torch.FloatStorage`-like global resolves to: only its element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _TypeMarker(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_TENSOR = _TypeMarker("torch.Tensor")
_PARAMETER = _TypeMarker("torch.nn.Parameter")


class StorageRef(_Inert):
    """A storage named by a persistent id: ('storage', type, key, location, numel), typed
    and sized by the first id that names it (as torch.load has it)."""

    __slots__ = ("dtype", "index", "key", "location", "numel")

    def __init__(self, dtype: str, key: str, location: str, numel: int, index: int) -> None:
        self.dtype = dtype
        self.key = key
        self.location = location
        self.numel = numel
        self.index = index


class TensorRecord(_Inert):
    """A tensor as the pickle describes it; turned into a real tensor once its storage is read."""

    __slots__ = (
        "dtype",
        "index",
        "meta",
        "offset",
        "parameter",
        "requires_grad",
        "shape",
        "storage",
        "strides",
    )

    def __init__(
        self,
        storage: StorageRef,
        dtype: str,
        offset: int,
        shape: list[int],
        strides: list[int],
        requires_grad: bool,
        meta: dict[str, bool],
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.requires_grad = requires_grad
        self.parameter = False
        self.index = -1
        self.meta = meta


# --------------------------------------------------------------------------- pickle
#
# The unpickler is our own loop over the opcodes rather than pickle.Unpickler, for two
# reasons the C unpickler gives no hook for: its memo is an array as long as the largest
# index a PUT names (a 9-byte pickle can make it zero-fill 8 GiB; here it is a dict, as in
# torch's weights-only unpickler), and it hashes dict keys as it builds them, so a key
# tuple nested a million deep overflows the C stack before anything can look at it (here
# every key and set element is measured first). Everything it builds is in proportion to
# the pickle: constructors that copy (bytearray, set, Counter, OrderedDict, a BUILD's
# attributes) draw on a budget of the pickle's size, so a memoized object cannot be
# copied again and again.

_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_F64 = struct.Struct(">d").unpack_from
_DICTS = (dict, collections.OrderedDict, collections.Counter)
_CONTAINERS = frozenset(
    (dict, list, tuple, set, frozenset, collections.OrderedDict, collections.Counter)
)
_MAX_OFFSET = 2**62  # a storage offset, in elements, as for shapes and strides


def _refuse(module: str, qualname: str) -> FormatError:
    return FormatError(
        f"the pickle names the global {module}.{qualname}, which tensorfile does not load "
        "(only tensors, Parameters, containers and plain values, as torch.load(weights_only=True)); "
        "it was not imported or called"
    )


def _int_list(x: Any, what: str) -> list[int]:
    if type(x) not in (tuple, list) and type(x).__name__ != "Size":
        raise FormatError(f"tensor {what} must be a tuple of ints")
    out = list(x)
    if len(out) > MAX_NDIM:
        raise FormatError(f"tensor {what} must be at most {MAX_NDIM} non-negative ints")
    for d in out:
        if type(d) is not int or not 0 <= d < 2**62:
            raise FormatError(f"tensor {what} must be at most {MAX_NDIM} non-negative ints")
    return out


def _check_meta(metadata: Any) -> dict[str, bool]:
    if metadata is None or metadata == {}:
        return {}
    if (
        not isinstance(metadata, dict)
        or not set(metadata) <= {"conj", "neg"}
        or not all(type(v) is bool for v in metadata.values())
    ):
        raise FormatError("tensor metadata may only hold the conj and neg flags")
    return {k: v for k, v in metadata.items() if v}


def check_nesting(root: Any) -> None:
    """Refuses an object graph with a node deeper than MAX_DEPTH (the root has depth 0;
    items, dict keys and values, and an OrderedDict's attributes are one deeper than
    their container), without recursion. Each container is measured once, so shared
    containers cost nothing more; a reference back to a container still being measured
    (a cycle, which lists and dicts may form) counts as a leaf."""
    if type(root) not in _CONTAINERS:
        return
    height: dict[int, int] = {}
    work: list[tuple[Any, bool]] = [(root, False)]
    while work:
        node, done = work.pop()
        kids: Any
        if type(node) in _DICTS:
            kids = [*node.keys(), *node.values()]
            attrs = getattr(node, "__dict__", None)
            if attrs:
                kids.append(attrs)
        else:
            kids = node
        if done:
            h = 0
            for c in kids:
                if type(c) in _CONTAINERS:
                    h = max(h, 1 + height[id(c)])
                elif h == 0:
                    h = 1
            if h > MAX_DEPTH:
                raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
            height[id(node)] = h
            continue
        if id(node) in height:
            continue
        height[id(node)] = 0  # being measured: a cycle back to it counts as a leaf
        work.append((node, True))
        work.extend((c, False) for c in kids if type(c) in _CONTAINERS and id(c) not in height)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise FormatError("complex may be built only from two numbers")
    return complex(real, imag)


_codecs_encode = _TypeMarker("_codecs.encode")  # stands for the global; see _Unpickler._encode


class _Unpickler:
    """Reads one pickle (protocols 0 to 5) from `data`. Globals resolve through
    `find_class` to the stand-ins and checked constructors of `allowed`; REDUCE, NEWOBJ
    and the like may call only those. `load` returns the root object."""

    def __init__(self, data: bytes, torch: Any, storage_names: set[str]) -> None:
        self.data = data
        self.torch = torch
        self.storage_names = storage_names
        self.storages: dict[str, StorageRef] = {}
        self.storage_list: list[StorageRef] = []
        self.records: list[TensorRecord] = []
        # elements that constructors may copy, in all (see the comment above)
        self.budget = 2 * len(data) + 65536
        self.tuple_heights: dict[int, tuple[tuple[Any, ...], int]] = {}
        self.rebuilds = (
            self._rebuild_v2,
            self._rebuild_v3,
            self._rebuild_v1,
            self._rebuild_parameter,
        )
        from_type = self._rebuild_from_type
        allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("collections", "Counter"): collections.Counter,
            ("builtins", "set"): set,
            ("builtins", "bytearray"): bytearray,
            ("builtins", "complex"): complex,
            ("_codecs", "encode"): _codecs_encode,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuilds[0],
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuilds[1],
            ("torch._utils", "_rebuild_tensor"): self.rebuilds[2],
            ("torch._utils", "_rebuild_parameter"): self.rebuilds[3],
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuilds[3],
            ("torch._tensor", "_rebuild_from_type_v2"): from_type,
        }
        # what each allowed global does when the pickle calls it
        calls: dict[int, Any] = {
            id(collections.OrderedDict): self._ordered_dict,
            id(collections.Counter): self._counter,
            id(set): self._set,
            id(bytearray): self._bytearray,
            id(complex): _complex,
            id(_codecs_encode): self._encode,
            id(from_type): from_type,
        }
        for m in self.rebuilds:
            calls[id(m)] = m
        if torch is not None:
            allowed[("torch", "Size")] = torch.Size
            allowed[("torch", "device")] = torch.device
            calls[id(torch.Size)] = self._size
            calls[id(torch.device)] = torch.device
        # Named only as _rebuild_from_type_v2's type argument: markers, never callables
        # (torch.Tensor(n) would allocate n elements).
        allowed[("torch", "Tensor")] = _TENSOR
        allowed[("torch._tensor", "Tensor")] = _TENSOR
        allowed[("torch.nn.parameter", "Parameter")] = _PARAMETER
        self.allowed = allowed
        self.calls = calls
        # classes NEWOBJ may instantiate (cls.__new__(cls, *args), as pickle does)
        self.classes = {id(collections.OrderedDict), id(collections.Counter)}
        if torch is not None:
            self.classes |= {id(torch.Size), id(torch.device)}

    # bounds ------------------------------------------------------------------
    def _spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise FormatError(
                "the pickle copies more elements than its size can account for "
                "(a memoized object built again and again)"
            )

    def _check_key(self, k: Any) -> None:
        """Hashing a tuple recurses through the tuples inside it, in C and without a
        depth check: measure a key (or set element) before a dict or set hashes it.
        Frozensets hash from their elements' stored hashes, so they end the descent."""
        heights = self.tuple_heights
        if type(k) is not tuple or id(k) in heights:
            return
        work: list[tuple[tuple[Any, ...], bool]] = [(k, False)]
        while work:
            t, done = work.pop()
            if done:
                h = 1
                for c in t:
                    if type(c) is tuple:
                        h = max(h, 1 + heights[id(c)][1])
                if h > MAX_DEPTH:
                    raise FormatError(
                        f"a dict key or set element nests tuples more than {MAX_DEPTH} deep"
                    )
                heights[id(t)] = (t, h)  # kept alive, so the id stays its own
                continue
            if id(t) in heights:
                continue
            work.append((t, True))
            work.extend((c, False) for c in t if type(c) is tuple and id(c) not in heights)

    def _check_keys(self, keys: Any) -> None:
        for k in keys:
            if type(k) is tuple:
                self._check_key(k)

    # checked constructors -----------------------------------------------------
    def _iterable_arg(self, what: str, args: tuple[Any, ...]) -> Any:
        if len(args) > 1:
            raise FormatError(f"{what} is called with {len(args)} arguments")
        if not args:
            return ()
        arg = args[0]
        if type(arg) in _DICTS or type(arg) in (list, tuple, set, frozenset):
            self._spend(len(arg))
            return arg
        raise FormatError(f"{what} may be built only from a container")

    def _ordered_dict(self, *args: Any) -> collections.OrderedDict[Any, Any]:
        if not args:  # torch.save's backward_hooks, one per tensor
            return collections.OrderedDict()
        arg = self._iterable_arg("OrderedDict", args)
        if type(arg) not in _DICTS:
            for pair in arg:
                if type(pair) not in (tuple, list) or len(pair) != 2:
                    raise FormatError("OrderedDict may be built only from key-value pairs")
                self._check_key(pair[0])
        return collections.OrderedDict(arg)

    def _counter(self, *args: Any) -> collections.Counter[Any]:
        arg = self._iterable_arg("Counter", args)
        if type(arg) not in _DICTS:
            self._check_keys(arg)
        return collections.Counter(arg)

    def _set(self, *args: Any) -> set[Any]:
        arg = self._iterable_arg("set", args)
        if type(arg) not in (list, tuple):
            raise FormatError("set may be built only from a list")
        self._check_keys(arg)
        return set(arg)

    def _bytearray(self, *args: Any) -> bytearray:
        if len(args) == 0:
            return bytearray()
        if len(args) == 1 and type(args[0]) is bytes:
            self._spend(len(args[0]))
            return bytearray(args[0])
        if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
            self._spend(len(args[0]))
            return bytearray(args[0].encode("latin1"))
        raise FormatError("bytearray may be built only from bytes")

    def _encode(self, text: Any, encoding: Any = "latin1") -> bytes:
        # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise FormatError("_codecs.encode is allowed only for latin-1 bytes")
        self._spend(len(text))
        return text.encode("latin1")

    def _size(self, *args: Any) -> Any:
        if len(args) == 1 and type(args[0]) in (list, tuple):
            self._spend(len(args[0]))
        return self.torch.Size(*args)

    def _call(self, func: Any, args: Any) -> Any:
        call = self.calls.get(id(func))
        if call is None:
            what = func.name if type(func) is _TypeMarker else f"a {type(func).__name__}"
            raise FormatError(
                f"data.pkl is not a valid torch.save pickle: it calls {what}, "
                "which is not a function it may call"
            )
        if type(args) is not tuple:
            raise FormatError("the arguments of a call in the pickle must be a tuple")
        return call(*args)

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if id(cls) not in self.classes:
            raise FormatError(
                f"the pickle instantiates a {type(cls).__name__}, which is not a class it may build"
            )
        if type(args) is not tuple or type(kwargs) is not dict:
            raise FormatError("the arguments of NEWOBJ must be a tuple and a dict")
        self._spend(len(args) + len(kwargs))
        return cls.__new__(cls, *args, **kwargs)

    def _build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, _Inert):
            inst.__setstate__(state)
        if type(inst) not in (collections.OrderedDict, collections.Counter):
            raise FormatError(f"the pickle sets the state of a {type(inst).__name__}")
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict or not all(type(k) is str for k in part):
                raise FormatError("the state a pickle sets must be a dict of attribute names")
            self._spend(len(part))
            inst.__dict__.update(part)

    # globals -----------------------------------------------------------------
    def find_class(self, module: Any, name: Any) -> Any:
        if type(module) is not str or type(name) is not str:
            raise FormatError("a global's module and name must be strings")
        if module == "torch.tensor":  # renamed in PyTorch 1.8, as torch.load maps it
            module = "torch._tensor"
        elif module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            module = "builtins"
        got = self.allowed.get((module, name))
        if got is not None:
            return got
        if module in ("torch", "torch.storage", "torch.cuda"):
            if name in _STORAGE_TYPES:
                return StorageType(_STORAGE_TYPES[name])
            if name in _QUANTIZED_STORAGES:
                raise FormatError(f"quantized storages ({name}) are not supported")
            if module == "torch" and name in TORCH_ITEMSIZE and self.torch is not None:
                return getattr(self.torch, name)
        raise _refuse(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise FormatError("the pickle holds a persistent id that is not a storage reference")
        _, stype, key, location, numel = pid
        if not isinstance(stype, StorageType):
            raise FormatError("a storage reference names no storage type")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise FormatError("a storage reference is malformed")
        ref = self.storages.get(key)
        if ref is None:
            if key not in self.storage_names:
                raise FormatError(f"the pickle refers to storage {key!r}, which has no data record")
            ref = StorageRef(stype.dtype, key, location, numel, len(self.storage_list))
            self.storages[key] = ref
            self.storage_list.append(ref)
        elif ref.location != location:
            raise FormatError(f"storage {key!r} is referred to with two locations")
        # As torch.load: a storage is loaded once, typed as its first reference says,
        # and every later reference gets that same storage, whatever type it names.
        return ref

    # the opcode loop ----------------------------------------------------------
    def load(self) -> Any:
        data = self.data
        n = len(data)
        memo: dict[Any, Any] = {}
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        append = stack.append
        call = self._call
        calls = self.calls
        persistent_load = self.persistent_load
        check_key = self._check_key
        pos = 0
        obj: Any
        func: Any

        def line(pos: int) -> tuple[bytes, int]:
            end = data.index(b"\n", pos)
            return data[pos:end], end + 1

        def chunk(pos: int, nbytes: int) -> bytes:
            if nbytes < 0 or pos + nbytes > n:
                raise FormatError("the pickle ends inside an argument (truncated)")
            return data[pos : pos + nbytes]

        while True:
            op = data[pos]
            pos += 1
            # the opcodes of torch.save's protocol-2 pickles, most frequent first
            if op == 0x72:  # LONG_BINPUT
                memo[_U32(data, pos)[0]] = stack[-1]
                pos += 4
            elif op == 0x68:  # BINGET
                append(memo[data[pos]])
                pos += 1
            elif op == 0x4B:  # BININT1
                append(data[pos])
                pos += 1
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                append = stack.append
            elif op == 0x58:  # BINUNICODE
                (size,) = _U32(data, pos)
                pos += 4
                end = pos + size
                if end > n:
                    raise FormatError("the pickle ends inside a string (truncated)")
                obj = str(data[pos:end], "utf-8", "surrogatepass")
                append(obj)
                pos = end
                if data[pos] == 0x72:  # the LONG_BINPUT that usually follows, inline
                    memo[_U32(data, pos + 1)[0]] = obj
                    pos += 5
            elif op == 0x74:  # TUPLE
                obj = tuple(stack)
                stack = metastack.pop()
                append = stack.append
                append(obj)
                if data[pos] == 0x72:
                    memo[_U32(data, pos + 1)[0]] = obj
                    pos += 5
            elif op == 0x85:  # TUPLE1
                obj = stack[-1] = (stack[-1],)
                if data[pos] == 0x72:
                    memo[_U32(data, pos + 1)[0]] = obj
                    pos += 5
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                func = calls.get(id(stack[-1]))
                if func is None or type(args) is not tuple:
                    call(stack[-1], args)  # raises the error
                obj = stack[-1] = func(*args)
                if data[pos] == 0x72:
                    memo[_U32(data, pos + 1)[0]] = obj
                    pos += 5
            elif op == 0x4D:  # BININT2
                append(_U16(data, pos)[0])
                pos += 2
            elif op == 0x51:  # BINPERSID
                stack[-1] = persistent_load(stack[-1])
            elif op == 0x89:  # NEWFALSE
                append(False)
            elif op == 0x29:  # EMPTY_TUPLE
                append(())
            elif op == 0x71:  # BINPUT
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == 0x6A:  # LONG_BINGET
                append(memo[_U32(data, pos)[0]])
                pos += 4
            elif op == 0x75:  # SETITEMS
                items = stack
                stack = metastack.pop()
                append = stack.append
                target = stack[-1]
                if type(target) not in _DICTS or len(items) % 2:
                    raise FormatError("SETITEMS needs a dict and pairs of items")
                keys = items[::2]
                self._check_keys(keys)
                target.update(zip(keys, items[1::2]))
            elif op == 0x73:  # SETITEM
                value = stack.pop()
                key = stack.pop()
                target = stack[-1]
                if type(target) not in _DICTS:
                    raise FormatError("SETITEM needs a dict")
                if type(key) is tuple:
                    check_key(key)
                target[key] = value
            elif op == 0x7D:  # EMPTY_DICT
                append({})
            elif op == 0x5D:  # EMPTY_LIST
                append([])
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == 0x88:  # NEWTRUE
                append(True)
            elif op == 0x4E:  # NONE
                append(None)
            elif op == 0x4A:  # BININT
                append(_I32(data, pos)[0])
                pos += 4
            elif op == 0x8C:  # SHORT_BINUNICODE
                size = data[pos]
                append(str(chunk(pos + 1, size), "utf-8", "surrogatepass"))
                pos += 1 + size
            elif op == 0x61:  # APPEND
                value = stack.pop()
                if type(stack[-1]) is not list:
                    raise FormatError("APPEND needs a list")
                stack[-1].append(value)
            elif op == 0x65:  # APPENDS
                items = stack
                stack = metastack.pop()
                append = stack.append
                if type(stack[-1]) is not list:
                    raise FormatError("APPENDS needs a list")
                stack[-1].extend(items)
            elif op == 0x2E:  # STOP
                return stack.pop()
            elif op == 0x63:  # GLOBAL
                module, pos = line(pos)
                name, pos = line(pos)
                append(self.find_class(module.decode("utf-8"), name.decode("utf-8")))
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                stack[-1] = self.find_class(stack[-1], name)
            elif op == 0x80:  # PROTO
                if data[pos] > pickle.HIGHEST_PROTOCOL:
                    raise FormatError(f"pickle protocol {data[pos]} is not supported")
                pos += 1
            elif op == 0x95:  # FRAME: a hint for streaming readers; the bytes are all here
                chunk(pos + 8, _U64(data, pos)[0])
                pos += 8
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x8A:  # LONG1
                size = data[pos]
                append(int.from_bytes(chunk(pos + 1, size), "little", signed=True))
                pos += 1 + size
            elif op == 0x8B:  # LONG4
                (size,) = _I32(data, pos)
                append(int.from_bytes(chunk(pos + 4, size), "little", signed=True))
                pos += 4 + size
            elif op == 0x47:  # BINFLOAT
                append(_F64(data, pos)[0])
                pos += 8
            elif op == 0x43:  # SHORT_BINBYTES
                size = data[pos]
                append(chunk(pos + 1, size))
                pos += 1 + size
            elif op == 0x42:  # BINBYTES
                (size,) = _U32(data, pos)
                append(chunk(pos + 4, size))
                pos += 4 + size
            elif op == 0x8E or op == 0x8D or op == 0x96:  # BINBYTES8, BINUNICODE8, BYTEARRAY8
                (size,) = _U64(data, pos)
                raw = chunk(pos + 8, size)
                pos += 8 + size
                if op == 0x8E:
                    append(raw)
                elif op == 0x8D:
                    append(str(raw, "utf-8", "surrogatepass"))
                else:
                    append(bytearray(raw))
            elif op == 0x55 or op == 0x54:  # SHORT_BINSTRING, BINSTRING (Python 2 str)
                if op == 0x55:
                    size, pos = data[pos], pos + 1
                else:
                    (size,), pos = _I32(data, pos), pos + 4
                append(chunk(pos, size).decode("utf-8"))
                pos += size
            elif op == 0x8F:  # EMPTY_SET
                append(set())
            elif op == 0x90:  # ADDITEMS
                items = stack
                stack = metastack.pop()
                append = stack.append
                if type(stack[-1]) is not set:
                    raise FormatError("ADDITEMS needs a set")
                self._check_keys(items)
                stack[-1].update(items)
            elif op == 0x91:  # FROZENSET
                items = stack
                stack = metastack.pop()
                append = stack.append
                self._check_keys(items)
                append(frozenset(items))
            elif op == 0x64 or op == 0x6C:  # DICT, LIST
                items = stack
                stack = metastack.pop()
                append = stack.append
                if op == 0x6C:
                    append(items)
                    continue
                if len(items) % 2:
                    raise FormatError("DICT needs pairs of items")
                keys = items[::2]
                self._check_keys(keys)
                append(dict(zip(keys, items[1::2])))
            elif op == 0x62:  # BUILD
                state = stack.pop()
                self._build(stack[-1], state)
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                stack[-1] = self._new(stack[-1], args, {})
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = stack.pop()
                args = stack.pop()
                stack[-1] = self._new(stack[-1], args, kwargs)
            elif op == 0x69 or op == 0x6F:  # INST, OBJ
                if op == 0x69:
                    module, pos = line(pos)
                    name, pos = line(pos)
                    cls = self.find_class(module.decode("ascii"), name.decode("ascii"))
                items = stack
                stack = metastack.pop()
                append = stack.append
                if op == 0x6F:
                    cls, items = items[0], items[1:]
                append(call(cls, tuple(items)))
            elif op == 0x30:  # POP (of the mark itself when the stack above it is empty)
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
                    append = stack.append
            elif op == 0x31:  # POP_MARK
                stack = metastack.pop()
                append = stack.append
            elif op == 0x32:  # DUP
                append(stack[-1])
            elif op == 0x50:  # PERSID
                pid, pos = line(pos)
                append(persistent_load(pid.decode("ascii")))
            elif op == 0x70 or op == 0x67:  # PUT, GET (decimal index on a line)
                text, pos = line(pos)
                if not text.isdigit():
                    raise FormatError("a memo index must be a non-negative decimal")
                if op == 0x70:
                    memo[int(text)] = stack[-1]
                else:
                    append(memo[int(text)])
            elif op == 0x49 or op == 0x4C:  # INT, LONG (decimal on a line)
                text, pos = line(pos)
                if op == 0x49 and text in (b"00", b"01"):
                    append(text == b"01")
                else:
                    append(int(text[:-1] if op == 0x4C and text.endswith(b"L") else text, 0))
            elif op == 0x46:  # FLOAT
                text, pos = line(pos)
                append(float(text))
            elif op == 0x53:  # STRING
                text, pos = line(pos)
                if len(text) < 2 or text[0] != text[-1] or text[0] not in b"\"'":
                    raise FormatError("the STRING opcode argument must be quoted")
                append(codecs.escape_decode(text[1:-1])[0].decode("utf-8"))
            elif op == 0x56:  # UNICODE
                text, pos = line(pos)
                append(str(text, "raw-unicode-escape"))
            elif op in (0x82, 0x83, 0x84):
                raise FormatError("the pickle uses the copyreg extension registry")
            elif op in (0x97, 0x98):
                raise FormatError("the pickle uses out-of-band buffers")
            else:
                raise FormatError(f"unknown pickle opcode 0x{op:02x} at byte {pos - 1}")

    # rebuild functions ---------------------------------------------------------
    def _record(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        dtype: str | None,
        metadata: Any,
    ) -> TensorRecord:
        if type(storage) is not StorageRef:
            raise FormatError("a tensor is rebuilt from something that is not a storage")
        ref = storage
        dtype = storage.dtype if dtype is None else dtype
        if dtype not in TORCH_ITEMSIZE:
            raise FormatError(f"tensor dtype {dtype} is not supported")
        if type(offset) is not int or not 0 <= offset < _MAX_OFFSET:
            raise FormatError("a tensor's storage offset must be a non-negative int below 2^62")
        shape = _int_list(size, "shape")
        strides = _int_list(stride, "strides")
        self.budget -= 2 * len(shape)
        if self.budget < 0:
            self._spend(0)  # raises the error
        if len(shape) != len(strides):
            raise FormatError("a tensor's shape and strides differ in length")
        # torch multiplies out the sizes with overflow checks, zeros or not; and zero
        # strides keep a huge shape inside a tiny storage
        if math.prod(shape if 0 not in shape else filter(None, shape)) >= 2**62:
            raise FormatError(f"a tensor's shape {shape} has more elements than any tensor can")
        if type(requires_grad) is not bool:
            raise FormatError("a tensor's requires_grad must be a bool")
        meta = _check_meta(metadata) if metadata else {}
        rec = TensorRecord(ref, dtype, offset, shape, strides, requires_grad, meta)
        # the storage's typed numel is checked against its record's size later
        rec.index = len(self.records)
        self.records.append(rec)
        return rec

    def _rebuild_v1(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRecord:
        return self._record(storage, offset, size, stride, False, None, None)

    def _rebuild_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        metadata: Any = None,
    ) -> TensorRecord:
        return self._record(storage, offset, size, stride, requires_grad, None, metadata)

    def _rebuild_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> TensorRecord:
        torch = self.torch
        if torch is None or not isinstance(dtype, torch.dtype):
            raise FormatError("_rebuild_tensor_v3 needs a dtype")
        return self._record(
            storage,
            offset,
            size,
            stride,
            requires_grad,
            str(dtype).removeprefix("torch."),
            metadata,
        )

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any, hooks: Any, state: Any = None
    ) -> TensorRecord:
        if not isinstance(data, TensorRecord) or type(requires_grad) is not bool:
            raise FormatError("a Parameter is rebuilt from something that is not a tensor")
        data.parameter = True
        data.requires_grad = requires_grad
        return data

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> TensorRecord:
        if not any(func is r for r in self.rebuilds):
            raise FormatError("_rebuild_from_type_v2 names a function that is not a tensor rebuild")
        if new_type is not _TENSOR and new_type is not _PARAMETER:
            raise FormatError("tensor subclasses are not supported")
        if type(args) is not tuple:
            raise FormatError("_rebuild_from_type_v2 arguments must be a tuple")
        rec = func(*args)
        if new_type is _PARAMETER:
            rec.parameter = True
        return rec


def unpickle(
    data: bytes, torch: Any, storage_names: set[str], name: str
) -> tuple[Any, list[TensorRecord], list[StorageRef]]:
    if torch is None:
        raise ImportError(f"{name} is a torch.save file: install torch to load it")
    up = _Unpickler(data, torch, storage_names)
    try:
        # one or two objects per opcode, few of them garbage: the collector's passes
        # over them would cost more than the loop itself
        with no_gc():
            root = up.load()
        check_nesting(root)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    except Exception as e:  # hostile bytes must end in a FormatError, whatever they break
        raise FormatError(
            f"{name}: data.pkl is not a valid torch.save pickle ({type(e).__name__}: {e})"
        ) from None
    return root, up.records, up.storage_list
