"""What a torch.save pickle may name and call, as torch.load(weights_only=True) allows for
tensors and plain containers: the stand-ins its globals resolve to (nothing from the file is
imported or called), the storage types, the checked constructors, and the tensor rebuilds
that turn its calls into `TensorRecord`s naming `StorageRef`s."""

from __future__ import annotations

import collections
import math
from typing import Any

from .._dtypes import TORCH_ITEMSIZE
from .._errors import FormatError
from .picklebounds import DICT_TYPES, Budget

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


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise FormatError("complex may be built only from two numbers")
    return complex(real, imag)


_codecs_encode = _TypeMarker("_codecs.encode")  # stands for the global; see TorchGlobals._encode


class TorchGlobals:
    """The globals, persistent ids, calls and instantiations one torch.save pickle may
    use. `find_class` resolves a global to a stand-in or a checked constructor of
    `allowed`; `call` (with its table `calls`, keyed by the callable's id), `new` and
    `build` are what REDUCE, NEWOBJ and BUILD may do with them; `persistent_load` turns
    storage ids into `StorageRef`s. What the constructors copy is spent from `budget`.
    After the pickle is read, `records` holds its tensors in pickle order and
    `storage_list` its storages in first-use order."""

    def __init__(self, torch: Any, storage_names: set[str], budget: Budget) -> None:
        self.torch = torch
        self.storage_names = storage_names
        self.budget = budget
        self.storages: dict[str, StorageRef] = {}
        self.storage_list: list[StorageRef] = []
        self.records: list[TensorRecord] = []
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

    # checked constructors -----------------------------------------------------
    def _iterable_arg(self, what: str, args: tuple[Any, ...]) -> Any:
        if len(args) > 1:
            raise FormatError(f"{what} is called with {len(args)} arguments")
        if not args:
            return ()
        arg = args[0]
        if type(arg) in DICT_TYPES or type(arg) in (list, tuple, set, frozenset):
            self.budget.spend(len(arg))
            return arg
        raise FormatError(f"{what} may be built only from a container")

    def _ordered_dict(self, *args: Any) -> collections.OrderedDict[Any, Any]:
        if not args:  # torch.save's backward_hooks, one per tensor
            return collections.OrderedDict()
        arg = self._iterable_arg("OrderedDict", args)
        if type(arg) not in DICT_TYPES:
            for pair in arg:
                if type(pair) not in (tuple, list) or len(pair) != 2:
                    raise FormatError("OrderedDict may be built only from key-value pairs")
                self.budget.check_key(pair[0])
        else:  # copying a dict hashes its keys again: that costs their visits again
            self.budget.check_keys(arg)
        return collections.OrderedDict(arg)

    def _counter(self, *args: Any) -> collections.Counter[Any]:
        arg = self._iterable_arg("Counter", args)
        self.budget.check_keys(arg)  # a dict's keys too: copying one hashes them again
        return collections.Counter(arg)

    def _set(self, *args: Any) -> set[Any]:
        arg = self._iterable_arg("set", args)
        if type(arg) not in (list, tuple):
            raise FormatError("set may be built only from a list")
        self.budget.check_keys(arg)
        return set(arg)

    def _bytearray(self, *args: Any) -> bytearray:
        if len(args) == 0:
            return bytearray()
        if len(args) == 1 and type(args[0]) is bytes:
            self.budget.spend(len(args[0]))
            return bytearray(args[0])
        if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
            self.budget.spend(len(args[0]))
            return bytearray(args[0].encode("latin1"))
        raise FormatError("bytearray may be built only from bytes")

    def _encode(self, text: Any, encoding: Any = "latin1") -> bytes:
        # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise FormatError("_codecs.encode is allowed only for latin-1 bytes")
        self.budget.spend(len(text))
        return text.encode("latin1")

    def _size(self, *args: Any) -> Any:
        if len(args) == 1 and type(args[0]) in (list, tuple):
            self.budget.spend(len(args[0]))
        return self.torch.Size(*args)

    def call(self, func: Any, args: Any) -> Any:
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

    def new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if id(cls) not in self.classes:
            raise FormatError(
                f"the pickle instantiates a {type(cls).__name__}, which is not a class it may build"
            )
        if type(args) is not tuple or type(kwargs) is not dict:
            raise FormatError("the arguments of NEWOBJ must be a tuple and a dict")
        self.budget.spend(len(args) + len(kwargs))
        return cls.__new__(cls, *args, **kwargs)

    def build(self, inst: Any, state: Any) -> None:
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
            self.budget.spend(len(part))
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
        self.budget.spend(2 * len(shape))
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
