"""The bounds the torch.save unpickler keeps, so that what it builds costs time and memory in
proportion to the pickle: a budget for copies, the measure of every dict key and set element
before it is hashed, and the depth of the finished graph."""

from __future__ import annotations

import collections
from typing import Any

from .._errors import FormatError

MAX_DEPTH = 200

DICT_TYPES = (dict, collections.OrderedDict, collections.Counter)
CONTAINER_TYPES = frozenset(
    (dict, list, tuple, set, frozenset, collections.OrderedDict, collections.Counter)
)


class Budget:
    """One allowance, in elements, for what a pickle's constructors may copy (bytearray,
    set, Counter, OrderedDict, a BUILD's attributes, a tensor's shape), so a memoized
    object cannot be copied again and again. It also measures each dict key and set
    element before a dict or set hashes it (`check_key`). Not thread-safe; one per pickle."""

    __slots__ = ("left", "tuples")

    def __init__(self, elements: int) -> None:
        self.left = elements
        # id -> (the tuple, its height); the tuple is kept alive, so its id stays its own
        self.tuples: dict[int, tuple[tuple[Any, ...], int]] = {}

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FormatError(
                "the pickle copies more elements than its size can account for "
                "(a memoized object built again and again)"
            )

    def check_key(self, k: Any) -> None:
        """Hashing a tuple recurses through the tuples inside it, in C and without a
        depth check: measure a key (or set element) before a dict or set hashes it.
        Frozensets hash from their elements' stored hashes, so they end the descent."""
        heights = self.tuples
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
                heights[id(t)] = (t, h)
                continue
            if id(t) in heights:
                continue
            work.append((t, True))
            work.extend((c, False) for c in t if type(c) is tuple and id(c) not in heights)

    def check_keys(self, keys: Any) -> None:
        for k in keys:
            if type(k) is tuple:
                self.check_key(k)


def check_nesting(root: Any) -> None:
    """Refuses an object graph with a node deeper than MAX_DEPTH (the root has depth 0;
    items, dict keys and values, and an OrderedDict's attributes are one deeper than
    their container), without recursion. Each container is measured once, so shared
    containers cost nothing more; a reference back to a container still being measured
    (a cycle, which lists and dicts may form) counts as a leaf."""
    if type(root) not in CONTAINER_TYPES:
        return
    height: dict[int, int] = {}
    work: list[tuple[Any, bool]] = [(root, False)]
    while work:
        node, done = work.pop()
        kids: Any
        if type(node) in DICT_TYPES:
            kids = [*node.keys(), *node.values()]
            attrs = getattr(node, "__dict__", None)
            if attrs:
                kids.append(attrs)
        else:
            kids = node
        if done:
            h = 0
            for c in kids:
                if type(c) in CONTAINER_TYPES:
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
        work.extend((c, False) for c in kids if type(c) in CONTAINER_TYPES and id(c) not in height)
