"""The restricted unpickler of torch.save files' data.pkl: our own loop over the pickle
opcodes, with its memo in a dict, whose globals resolve only to what `TorchGlobals` allows
(nothing from the file is imported or called) and whose cost `Budget` and `check_nesting`
keep in proportion to the pickle's size."""

from __future__ import annotations

import codecs
import pickle
import struct
from typing import Any

from .._errors import FormatError
from .._tree import no_gc
from .picklebounds import DICT_TYPES, Budget, check_nesting
from .torchglobals import StorageRef, TensorRecord, TorchGlobals

# The unpickler is our own loop over the opcodes rather than pickle.Unpickler, for two
# reasons the C unpickler gives no hook for: its memo is an array as long as the largest
# index a PUT names (a 9-byte pickle can make it zero-fill 8 GiB; here it is a dict, as in
# torch's weights-only unpickler), and it hashes dict keys as it builds them, so a key
# tuple nested a million deep overflows the C stack, and one of tuples shared within it
# takes 2^n steps, before anything can look at it (here every key and set element is
# measured first). Everything it builds is in proportion to the pickle: constructors that
# copy (bytearray, set, Counter, OrderedDict, a BUILD's attributes) and the hashing of keys
# draw on a budget of the pickle's size, so a memoized object cannot be copied again and
# again, and the finished graph may unfold into at most 16 values per pickle byte.

_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_F64 = struct.Struct(">d").unpack_from


def _run(data: bytes, names: TorchGlobals, budget: Budget) -> Any:
    """Runs the opcodes of one pickle (protocols 0 to 5) and returns its root object.
    Globals, persistent ids, calls, NEWOBJ and BUILD go through `names`; every dict key
    and set element is measured by `budget` before it is hashed."""
    n = len(data)
    memo: dict[Any, Any] = {}
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    append = stack.append
    call = names.call
    calls = names.calls
    persistent_load = names.persistent_load
    find_class = names.find_class
    check_key = budget.check_key
    check_keys = budget.check_keys
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
            if type(target) not in DICT_TYPES or len(items) % 2:
                raise FormatError("SETITEMS needs a dict and pairs of items")
            keys = items[::2]
            check_keys(keys)
            target.update(zip(keys, items[1::2]))
        elif op == 0x73:  # SETITEM
            value = stack.pop()
            key = stack.pop()
            target = stack[-1]
            if type(target) not in DICT_TYPES:
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
            append(find_class(module.decode("utf-8"), name.decode("utf-8")))
        elif op == 0x93:  # STACK_GLOBAL
            name = stack.pop()
            stack[-1] = find_class(stack[-1], name)
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
            check_keys(items)
            stack[-1].update(items)
        elif op == 0x91:  # FROZENSET
            items = stack
            stack = metastack.pop()
            append = stack.append
            check_keys(items)
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
            check_keys(keys)
            append(dict(zip(keys, items[1::2])))
        elif op == 0x62:  # BUILD
            state = stack.pop()
            names.build(stack[-1], state)
        elif op == 0x81:  # NEWOBJ
            args = stack.pop()
            stack[-1] = names.new(stack[-1], args, {})
        elif op == 0x92:  # NEWOBJ_EX
            kwargs = stack.pop()
            args = stack.pop()
            stack[-1] = names.new(stack[-1], args, kwargs)
        elif op == 0x69 or op == 0x6F:  # INST, OBJ
            if op == 0x69:
                module, pos = line(pos)
                name, pos = line(pos)
                cls = find_class(module.decode("ascii"), name.decode("ascii"))
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


def unpickle(
    data: bytes, torch: Any, storage_names: set[str], name: str
) -> tuple[Any, list[TensorRecord], list[StorageRef]]:
    """Reads torch.save's data.pkl (`data`, from the file `name`) whose persistent ids
    may name only `storage_names`. Returns the root object, with `TensorRecord`s for its
    tensors, the records in pickle order and the storages in first-use order. Bad or
    hostile bytes raise FormatError naming `name`; a missing torch, ImportError."""
    if torch is None:
        raise ImportError(f"{name} is a torch.save file: install torch to load it")
    # elements that constructors may copy and key hashing may visit, in all
    budget = Budget(2 * len(data) + 65536)
    names = TorchGlobals(torch, storage_names, budget)
    try:
        # one or two objects per opcode, few of them garbage: the collector's passes
        # over them would cost more than the loop itself
        with no_gc():
            root = _run(data, names, budget)
        check_nesting(root, max_nodes=16 * len(data) + (1 << 20))
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    except Exception as e:  # hostile bytes must end in a FormatError, whatever they break
        raise FormatError(
            f"{name}: data.pkl is not a valid torch.save pickle ({type(e).__name__}: {e})"
        ) from None
    return root, names.records, names.storage_list
