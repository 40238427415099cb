"""JSON from untrusted files: nesting depth bounded before the parser sees the bytes.

Python's json module recurses once per nested array or object, and its C scanner stops
only at the interpreter's recursion limit: a caller that raised the limit lets a header
of a million `[` overflow the C stack. `check_depth` measures the nesting with a few
passes over the bytes (no recursion, no parse), so deep documents are refused whatever
the recursion limit, and `loads` parses only what it has checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from ._errors import FormatError

# Bytes that can change the nesting depth or start and end a string; every other byte
# is deleted before counting (multi-byte UTF-8 sequences never hold an ASCII byte).
_KEEP = b'"[]{}'
_DELETE = bytes(c for c in range(256) if c not in _KEEP)
_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = b"[]{}"
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_CHUNK = 1 << 22  # bytes of the document read at a time (bounds the temporaries)


def _hide_escaped_quotes(chunk: np.ndarray, run: int) -> tuple[np.ndarray, int]:
    """`chunk` with every escaped quote (the `"` of a `\\"` escape) replaced by a
    plain byte, so that the quotes left are those that open and close strings; `run` is
    the number of backslashes that ended the previous chunk. Returns the new chunk and
    the number of backslashes that end this one. JSON escapes are read left to right, so
    a byte is escaped when an odd number of backslashes come right before it."""
    bs = np.flatnonzero(chunk == _BACKSLASH)
    escaped = [np.zeros(1, dtype=np.int64)] if run % 2 and (not len(bs) or bs[0] != 0) else []
    tail = 0
    if len(bs):
        new_run = np.ones(len(bs), dtype=bool)
        new_run[1:] = bs[1:] != bs[:-1] + 1
        first = np.flatnonzero(new_run)  # index in bs of each run's first backslash
        length = np.diff(np.append(first, len(bs)))
        if bs[0] == 0:
            length[0] += run  # the previous chunk's run goes on here
        # the byte after a run is escaped when the run is odd; it is the run's last + 1
        after = bs[np.append(first[1:], len(bs)) - 1] + 1
        escaped.append(after[(length % 2 == 1) & (after < len(chunk))])
        if bs[-1] == len(chunk) - 1:
            tail = int(length[-1])
    where = np.concatenate(escaped) if escaped else np.zeros(0, dtype=np.int64)
    where = where[chunk[where] == _QUOTE]
    if len(where):
        chunk = chunk.copy()
        chunk[where] = ord("x")
    return chunk, tail


def max_depth_of(raw: bytes | bytearray | memoryview, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays and objects in the JSON text `raw` (UTF-8 bytes),
    brackets inside strings not counted; with `stop_above`, the count may stop early
    once it is passed. Up to its first error an invalid text is read here as a parser
    reads it, so the figure bounds the depth a parser reaches too. Time is linear, and
    memory a few times _CHUNK, whatever the length of `raw`."""
    data = bytes(raw)
    a = np.frombuffer(data, dtype=np.uint8)
    depth = deepest = run = 0
    in_string = False
    for begin in range(0, len(data), _CHUNK):
        end = begin + _CHUNK
        if run or data.find(b"\\", begin, end) >= 0:
            chunk, run = _hide_escaped_quotes(a[begin:end], run)
            reduced = chunk.tobytes().translate(None, _DELETE)
        else:
            reduced = data[begin:end].translate(None, _DELETE)
        part = np.frombuffer(reduced, dtype=np.uint8)
        if not len(part):
            continue
        # a byte is inside a string when an odd number of quotes precede it (quotes
        # themselves step 0, so which side of their string they count on does not matter)
        inside = np.bitwise_xor.accumulate(part == _QUOTE)
        if in_string:
            np.logical_not(inside, out=inside)
        np.logical_not(inside, out=inside)  # now: outside strings
        step = ((part == _OPEN_ARRAY) | (part == _OPEN_OBJECT)).view(np.int8) - (
            (part == _CLOSE_ARRAY) | (part == _CLOSE_OBJECT)
        ).view(np.int8)
        step *= inside.view(np.int8)
        levels = np.cumsum(step, dtype=np.int32)
        deepest = max(deepest, depth + int(levels.max()))
        depth += int(levels[-1])
        in_string = not bool(inside[-1])
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def check_depth(raw: bytes | bytearray | memoryview, *, name: str, max_depth: int) -> None:
    """Raises FormatError naming `name` if the JSON text `raw` nests arrays and objects
    more than `max_depth` deep (the outermost object counts as 1)."""
    deepest = max_depth_of(raw, stop_above=max_depth)
    if deepest > max_depth:
        raise FormatError(f"{name}: JSON nested more than {max_depth} deep")


def loads(
    raw: bytes | bytearray | memoryview | str,
    *,
    name: str,
    max_depth: int,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """json.loads of UTF-8 bytes (or text) nested at most `max_depth` deep, checked
    before parsing. Every failure is a FormatError whose message starts with `name`:
    too deep, not UTF-8, not JSON, or a FormatError raised by a hook (its message kept)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    check_depth(data, name=name, max_depth=max_depth)
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=parse_constant)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    except RecursionError:  # a recursion limit set below max_depth by the caller
        raise FormatError(f"{name}: JSON nested too deeply for this interpreter") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{name}: not valid UTF-8 JSON ({str(e)[:120]})") from None
