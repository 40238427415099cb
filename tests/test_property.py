"""Property: for random nested objects of tensors, arrays and plain values,
load(save(obj)) equals obj in values (bitwise), types, dtypes, shapes, strides and in
which leaves are the same object or share memory."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import tensorfile
import torch
from _util import assert_same, leaves, sharing_pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

# When a hypothesis test fails, its pytest plugin touches a deprecated name while it
# writes the report; with warnings as errors that would hide the falsifying example.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.bool,
    torch.complex64,
]
NUMPY_DTYPES = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint32",
    "bool",
    "complex64",
    "complex128",
]

RANDOMS = st.randoms(use_true_random=False)


def _shape(rnd) -> list[int]:
    """Mostly 1-3 dims of 2-6; sometimes 0-d, a dim of 1 or an empty dim."""
    ndim = rnd.choice([0, 1, 1, 2, 2, 2, 3, 3])
    return [rnd.choice([0, 1, 2, 3, 4, 5, 6, 3, 4, 5]) for _ in range(ndim)]


def _random_bytes(seed: int, n: int, boolean: bool) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    return raw % 2 if boolean else raw


@st.composite
def torch_bases(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    rnd = draw(RANDOMS)
    shape = _shape(rnd)
    n = int(np.prod(shape, dtype=np.int64))
    raw = _random_bytes(rnd.getrandbits(32), n * dtype.itemsize, dtype is torch.bool)
    if n:
        t = torch.from_numpy(raw).view(dtype).reshape(shape).clone()
    else:
        t = torch.empty(shape, dtype=dtype)
    if dtype.is_floating_point or dtype.is_complex:
        kind = rnd.choice(["plain", "plain", "grad", "param", "frozen-param"])
        if kind == "grad":
            t.requires_grad_(True)
        elif kind == "param":
            t = nn.Parameter(t)
        elif kind == "frozen-param":
            t = nn.Parameter(t, requires_grad=False)
    return t


def _span(rnd, d):
    """0 <= start <= stop <= d, nonempty five times in six."""
    if d and rnd.random() < 5 / 6:
        start = rnd.randrange(0, (d + 1) // 2)
        return start, rnd.randint(max(start + 1, d // 2), d)
    start = rnd.randint(0, d)
    return start, start


@st.composite
def views(draw, base):
    """A view of `base`: an optional permutation of the dims, then a slice with a step on
    each dim, sometimes selecting an index (dropping a dim)."""
    rnd = draw(RANDOMS)
    t = base
    if t.dim() >= 2 and rnd.random() < 0.5:
        order = list(range(t.dim()))
        rnd.shuffle(order)
        t = t.permute(order)
    index = []
    for d in t.shape:
        if d and rnd.random() < 0.15:
            index.append(rnd.randrange(d))
            continue
        start, stop = _span(rnd, d)
        index.append(slice(start, stop, rnd.choice([1, 2, 2, 3])))
    return t[tuple(index)] if index else t[...]


@st.composite
def numpy_bases(draw):
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    rnd = draw(RANDOMS)
    shape = _shape(rnd)
    n = int(np.prod(shape, dtype=np.int64))
    raw = _random_bytes(rnd.getrandbits(32), n * dtype.itemsize, dtype.kind == "b")
    a = raw.view(dtype).reshape(shape)
    if rnd.random() < 0.3:
        a = np.asfortranarray(a)
    return a


@st.composite
def numpy_views(draw, base):
    """A view of `base`: an optional transpose, then a slice on each dim with a step
    that may be negative."""
    rnd = draw(RANDOMS)
    a = base
    if a.ndim >= 2 and rnd.random() < 0.5:
        order = list(range(a.ndim))
        rnd.shuffle(order)
        a = a.transpose(order)
    index = []
    for d in a.shape:
        step = rnd.choice([1, 2, 3, -1, -2, -3])
        lo, hi = _span(rnd, d)
        if step > 0:
            index.append(slice(lo, hi, step))
        else:  # the same elements, walked backwards
            index.append(slice(hi - 1 if hi else None, lo - 1 if lo else None, step))
    out = a[tuple(index)] if index else a[...]
    if out.size == 0:
        # An empty view whose address lies inside another array splits that array's
        # sharing (test_roundtrip.py::test_numpy_empty_view_keeps_sharing shows the bug
        # on its own); here empty arrays get their own memory.
        out = out.copy()
    return out


FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def _no_surrogate_pair(s: str) -> bool:
    # A high surrogate followed by a low one is written as a JSON surrogate pair and read
    # back as one astral character; test_roundtrip.py::test_adjacent_surrogates shows
    # that bug on its own, so the property does not keep tripping over it.
    return not any(
        "\ud800" <= a <= "\udbff" and "\udc00" <= b <= "\udfff" for a, b in zip(s, s[1:])
    )


TEXT = st.one_of(
    st.text(max_size=8),
    st.text(
        alphabet=st.one_of(
            st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.characters()
        ),
        max_size=4,
    ).filter(_no_surrogate_pair),
)
PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) - 3, 2**53 + 3),
    st.integers(-(2**130), 2**130),
    FLOATS,
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    TEXT,
    st.binary(max_size=12),
    st.binary(max_size=6).map(bytearray),
    st.sampled_from(
        [torch.float32, torch.int8, torch.bool, torch.Size([2, 0]), torch.device("cpu")]
    ),
    st.sampled_from(["float32", "int64", "bool", "uint8"]).flatmap(
        lambda name: (
            st.binary(min_size=np.dtype(name).itemsize, max_size=np.dtype(name).itemsize)
            .filter(lambda b, name=name: name != "bool" or b in (b"\x00", b"\x01"))
            .map(lambda b, name=name: np.frombuffer(b, dtype=name)[0].copy())
        )
    ),
)
KEYS = st.one_of(st.text(max_size=6), st.integers(-(2**60), 2**60))


def _containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(KEYS, children, max_size=4),
        st.dictionaries(KEYS, children, max_size=4).map(collections.OrderedDict),
    )


@st.composite
def objects(draw):
    """A container of 1-6 subtrees whose leaves are fresh tensors and arrays, views of a
    small pool of shared bases (so leaves share memory), the bases themselves (so the
    same object appears twice) and plain values."""
    pool = st.sampled_from(draw(st.lists(torch_bases(), min_size=1, max_size=3)))
    npool = st.sampled_from(draw(st.lists(numpy_bases(), min_size=1, max_size=2)))
    leaf = st.one_of(
        torch_bases(),
        pool,
        pool.flatmap(views),
        pool.flatmap(views),
        numpy_bases().flatmap(numpy_views),
        npool,
        npool.flatmap(numpy_views),
        PLAIN,
        PLAIN,
    )
    tree = st.recursive(leaf, _containers, max_leaves=12)
    items = draw(st.lists(tree, min_size=1, max_size=6))
    kind = draw(st.sampled_from(["list", "tuple", "dict", "odict"]))
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    keys = draw(st.lists(KEYS, min_size=len(items), max_size=len(items), unique=True))
    d = dict(zip(keys, items))
    return d if kind == "dict" else collections.OrderedDict(d)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "obj.tf"


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(obj=objects())
def test_roundtrip_property(scratch, obj):
    tensorfile.save(obj, scratch, durable=False)
    expected_sharing = sharing_pattern(leaves(obj))
    for kwargs in ({}, {"mmap": True}):
        out = tensorfile.load(scratch, **kwargs)
        assert_same(obj, out)
        assert sharing_pattern(leaves(out)) == expected_sharing
    # a stream receives exactly the bytes a path does, and reads back the same
    buf = io.BytesIO()
    tensorfile.save(obj, buf)
    assert buf.getvalue() == scratch.read_bytes()
    buf.seek(0)
    out = tensorfile.load(buf)
    assert_same(obj, out)
    assert sharing_pattern(leaves(out)) == expected_sharing


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=objects(), threads=st.integers(1, 4), task=st.sampled_from(["4096", "16384", "1048576"]))
def test_roundtrip_property_threads(scratch, obj, threads, task):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TENSORFILE_TASK_NBYTES", task)
        tensorfile.save(obj, scratch, durable=False, num_threads=threads)
        out = tensorfile.load(scratch, num_threads=threads)
    assert_same(obj, out)
    assert sharing_pattern(leaves(out)) == sharing_pattern(leaves(obj))


@settings(max_examples=40, deadline=None)
@given(obj=objects())
def test_open_get_matches_load(scratch, obj):
    tensorfile.save(obj, scratch, durable=False)
    full = tensorfile.load(scratch)
    with tensorfile.open(scratch) as f:
        keys = f.keys()
        assert len(keys) == len(set(keys))
        for key in keys[:8]:
            try:
                got = f.get(key)
            except KeyError:
                continue  # a key path that names two tensors ({"a.b": .., "a": {"b": ..}})
            assert isinstance(got, (torch.Tensor, np.ndarray))
        assert_same(full, f.load())
