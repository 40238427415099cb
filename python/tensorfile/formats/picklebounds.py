"""The bounds the torch.save unpickler keeps, so that what it builds costs time and memory in
proportion to the pickle: a budget for copies and key hashing, the measure of every dict key
and set element before it is hashed, and the depth and unfolded size of the finished graph."""

from __future__ import annotations

import collections
from typing import Any

from .._errors import FormatError

MAX_DEPTH = 200

DICT_TYPES = (dict, collections.OrderedDict, collections.Counter)
CONTAINER_TYPES = frozenset(
    (dict, list, tuple, set, frozenset, collections.OrderedDict, collections.Counter)
)


def _deep_key() -> FormatError:
    return FormatError(f"a dict key or set element nests tuples more than {MAX_DEPTH} deep")


def _grow(frame: list[Any], height: int, tuples: int) -> None:
    """Adds a measured child tuple to the frame of the tuple that holds it."""
    if height >= frame[2]:
        frame[2] = height + 1
        if frame[2] > MAX_DEPTH:
            raise _deep_key()
    frame[3] += tuples


class Budget:
    """One allowance, in elements, for what a pickle may cost beyond reading its bytes:
    elements that constructors copy (bytearray, set, Counter, OrderedDict, a BUILD's
    attributes, a tensor's shape), so a memoized object cannot be copied again and again,
    and tuples that hashing a key visits. It also measures each dict key and set element
    before a dict or set hashes it (`check_key`). Not thread-safe; one per pickle."""

    __slots__ = ("left", "tuples")

    def __init__(self, elements: int) -> None:
        self.left = elements
        # id -> (the tuple, its height, its tuples counted as often as reached); the tuple
        # is kept alive, so its id stays its own
        self.tuples: dict[int, tuple[tuple[Any, ...], int, int]] = {}

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FormatError(
                "the pickle copies more elements than its size can account for "
                "(a memoized object built again and again)"
            )

    def check_key(self, k: Any) -> None:
        """Hashing a tuple recurses through the tuples inside it, in C, without a depth
        check, and visits a tuple shared within it once for every path to it: refuses a
        key nested more than MAX_DEPTH deep, and spends the visits its hashing makes.
        Frozensets hash from their elements' stored hashes, so they end the descent."""
        if type(k) is not tuple:
            return
        known = self.tuples
        if id(k) in known:
            self._spend_on_hash(known[id(k)][2])
            return
        # depth first, so a key nested a million deep is refused at level MAX_DEPTH + 1;
        # each frame is [tuple, its items still to see, its height, its tuples unfolded]
        path: list[list[Any]] = [[k, iter(k), 1, 1]]
        while path:
            frame = path[-1]
            for c in frame[1]:
                if type(c) is not tuple:
                    continue
                got = known.get(id(c))
                if got is None:
                    if len(path) >= MAX_DEPTH:
                        raise _deep_key()
                    path.append([c, iter(c), 1, 1])
                    break
                _grow(frame, got[1], got[2])
            else:
                path.pop()
                known[id(frame[0])] = (frame[0], frame[2], frame[3])
                if path:
                    _grow(path[-1], frame[2], frame[3])
        self._spend_on_hash(known[id(k)][2])

    def check_keys(self, keys: Any) -> None:
        for k in keys:
            if type(k) is tuple:
                self.check_key(k)

    def _spend_on_hash(self, visits: int) -> None:
        # Hashing visits every tuple of a key as often as it is reached, each time a dict
        # or set takes the key: t = (t, t) a hundred times over is 2^100 visits.
        if visits > self.left:
            raise FormatError(
                "a dict key or set element is made of tuples shared within it, and hashing "
                f"it would visit {visits} of them"
            )
        self.spend(visits)


def check_nesting(root: Any, max_nodes: int) -> None:
    """Refuses an object graph with a node deeper than MAX_DEPTH (the root has depth 0;
    items, dict keys and values, and an OrderedDict's attributes are one deeper than
    their container), or one that unfolds into more than `max_nodes` nodes. The readers
    of the graph (key paths, substitution, diff) visit a dict, list or set once however
    often it is shared, but walk tuples as trees: a tuple counts once for each path to
    it from the nearest dict, list or set above it, and t = (t, t) a hundred times over
    is 2^100 nodes. Each container is measured once, without recursion; a reference back
    to a container still being measured (a cycle, which lists and dicts may form) counts
    as a leaf."""
    if type(root) not in CONTAINER_TYPES:
        return
    # id -> (height, nodes when unfolded: 1 for all but tuples, visited once)
    measured: dict[int, tuple[int, int]] = {}
    total = 0  # nodes the readers visit: each once-visited container's tuple trees
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
            nodes = 1
            for c in kids:
                if type(c) in CONTAINER_TYPES:
                    ch, cn = measured[id(c)]
                    h = max(h, 1 + ch)
                    nodes += cn
                else:
                    h = h or 1
                    nodes += 1
            if h > MAX_DEPTH:
                raise FormatError(f"containers are nested more than {MAX_DEPTH} deep")
            if type(node) is not tuple or node is root:
                total += nodes
                nodes = 1
            if total > max_nodes or nodes > max_nodes:
                raise FormatError(
                    f"the pickle's containers unfold into more than {max_nodes} values "
                    "(tuples shared again and again, nested in one another)"
                )
            measured[id(node)] = (h, nodes)
            continue
        if id(node) in measured:
            continue
        measured[id(node)] = (0, 1)  # being measured: a cycle back to it counts as a leaf
        work.append((node, True))
        work.extend(
            (c, False) for c in kids if type(c) in CONTAINER_TYPES and id(c) not in measured
        )
