"""Round trips: whatever save writes, load gives back with the same types, dtypes, shapes,
strides, values, flags and sharing; on paths, streams and mappings; through open()."""

from __future__ import annotations

import collections
import io
import math
import os

import numpy as np
import pytest
import tensorfile
import torch
from _util import (
    assert_array_same,
    assert_same,
    assert_tensor_same,
    leaves,
    sharing_pattern,
    tensor_bytes,
)
from tensorfile._dtypes import NUMPY_ITEMSIZE, TORCH_ITEMSIZE
from torch import nn


def roundtrip(obj, tmp_path, name="obj.tf", **load_kwargs):
    path = tmp_path / name
    tensorfile.save(obj, path)
    return tensorfile.load(path, **load_kwargs)


def _random_tensor(dtype, shape, seed=0):
    """Random bytes of any dtype (including those with no random kernel)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    size = TORCH_ITEMSIZE[str(dtype).removeprefix("torch.")]
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype is torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


# --------------------------------------------------------------------------- torch dtypes


# torch warns once per process whenever a complex32 tensor is created, loading included.
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.parametrize("name", sorted(TORCH_ITEMSIZE))
def test_every_torch_dtype(tmp_path, name):
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no dtype {name}")
    t = _random_tensor(dtype, (3, 4), seed=len(name))
    obj = {"dense": t, "transposed": t.t(), "row": t[1], "scalar": t[2, 3]}
    out = roundtrip(obj, tmp_path)
    for k in obj:
        assert out[k].dtype == dtype
        assert_tensor_same(obj[k], out[k], k)
    # the transposed view still shares the dense tensor's storage
    assert (
        out["transposed"].untyped_storage().data_ptr() == out["dense"].untyped_storage().data_ptr()
    )


def test_dtype_values_not_only_bytes(tmp_path):
    obj = {
        "f32": torch.tensor([1.5, -0.0, float("inf"), float("nan")]),
        "bf16": torch.tensor([1.0, -2.5], dtype=torch.bfloat16),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "u64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
        "bool": torch.tensor([True, False, True]),
    }
    out = roundtrip(obj, tmp_path)
    assert torch.equal(out["f32"][:3], obj["f32"][:3]) and bool(out["f32"][3].isnan())
    assert math.copysign(1.0, out["f32"][1].item()) == -1.0
    for k in ("bf16", "c64", "i64", "u64", "bool"):
        assert out[k].dtype == obj[k].dtype and torch.equal(out[k], obj[k])


def test_conj_and_neg_views_store_their_values(tmp_path):
    c = torch.randn(5, dtype=torch.complex64)
    conj, neg = c.conj(), c.conj().imag
    assert conj.is_conj() and neg.is_neg()
    out = roundtrip([conj, neg], tmp_path)
    assert torch.equal(out[0], conj) and torch.equal(out[1], neg)


# --------------------------------------------------------------------------- shapes and views


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.tensor(3.5), id="0d-float"),
        pytest.param(lambda: torch.tensor(True), id="0d-bool"),
        pytest.param(lambda: torch.tensor(-7, dtype=torch.int8), id="0d-int8"),
        pytest.param(lambda: torch.empty(0), id="empty"),
        pytest.param(lambda: torch.empty(3, 0, 2, dtype=torch.int16), id="empty-3d"),
        pytest.param(lambda: torch.arange(10.0)[4:4], id="empty-slice"),
        pytest.param(lambda: torch.randn(3, 4).t(), id="transposed"),
        pytest.param(lambda: torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2), id="permuted"),
        pytest.param(
            lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
            id="channels-last",
        ),
        pytest.param(lambda: torch.arange(100.0).reshape(10, 10)[1:8:3, ::2], id="strided"),
        pytest.param(lambda: torch.arange(60).reshape(3, 4, 5)[:, 1, 2:], id="sliced"),
        pytest.param(lambda: torch.arange(3).expand(4, 3), id="expanded-stride-0"),
        pytest.param(lambda: torch.arange(24.0).reshape(2, 3, 4)[..., None, :], id="unsqueezed"),
        pytest.param(lambda: torch.randn(1, 1, 1, 1), id="all-ones-shape"),
    ],
)
def test_shapes_and_views(tmp_path, make):
    t = make()
    out = roundtrip({"t": t}, tmp_path)["t"]
    assert_tensor_same(t, out)
    assert out.is_contiguous() == t.is_contiguous()
    if t.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last) == t.is_contiguous(
            memory_format=torch.channels_last
        )


def test_channels_last_stays_channels_last(tmp_path):
    t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    out = roundtrip(t, tmp_path)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()
    assert out.stride() == t.stride()
    assert torch.equal(out, t)


def test_requires_grad(tmp_path):
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    out = roundtrip({"a": a, "b": b}, tmp_path)
    assert out["a"].requires_grad and out["a"].is_leaf and type(out["a"]) is torch.Tensor
    assert not out["b"].requires_grad
    assert torch.equal(out["a"].detach(), a.detach())
    out["a"].sum().backward()  # a usable leaf
    assert torch.equal(out["a"].grad, torch.ones(3))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameter(tmp_path, requires_grad):
    p = nn.Parameter(torch.randn(4, 2), requires_grad=requires_grad)
    out = roundtrip({"p": p}, tmp_path)["p"]
    assert type(out) is nn.Parameter
    assert out.requires_grad is requires_grad
    assert torch.equal(out.detach(), p.detach())


def test_module_parameters_with_keep_vars(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[2].bias.requires_grad_(False)
    sd = net.state_dict(keep_vars=True)
    out = roundtrip(sd, tmp_path)
    assert list(out) == list(sd)
    for k in sd:
        assert type(out[k]) is nn.Parameter
        assert out[k].requires_grad == sd[k].requires_grad
        assert torch.equal(out[k].detach(), sd[k].detach())


# --------------------------------------------------------------------------- sharing


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_views_of_one_storage_share_after_load(tmp_path):
    a = torch.arange(10.0)
    b = a[2:5]
    c = a.view(2, 5)
    d = a[::3]
    out = roundtrip({"a": a, "b": b, "c": c, "d": d}, tmp_path)
    assert len({_ptr(out[k]) for k in "abcd"}) == 1
    for k, t in {"a": a, "b": b, "c": c, "d": d}.items():
        assert_tensor_same(t, out[k], k)
    out["b"][0] = 99.0  # one storage: a write through one view shows in the others
    assert out["a"][2].item() == 99.0 and out["c"][0, 2].item() == 99.0


def test_views_with_different_dtypes_share(tmp_path):
    a = torch.arange(8, dtype=torch.int32)
    b = a.view(torch.uint8)[4:12]
    out = roundtrip([a, b], tmp_path)
    assert _ptr(out[0]) == _ptr(out[1])
    assert_tensor_same(a, out[0])
    assert_tensor_same(b, out[1])


def test_distinct_storages_stay_distinct(tmp_path):
    a = torch.arange(4.0)
    b = a.clone()
    out = roundtrip([a, b], tmp_path)
    assert _ptr(out[0]) != _ptr(out[1])


def test_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    net = Tied()
    sd = net.state_dict()
    assert sd["embed.weight"] is not sd["head.weight"]  # detached copies, one storage
    out = roundtrip(sd, tmp_path)
    assert _ptr(out["embed.weight"]) == _ptr(out["head.weight"])
    clone = Tied()
    clone.load_state_dict(out)
    assert torch.equal(clone.head.weight, net.head.weight)
    assert clone.head.weight is clone.embed.weight


def test_same_object_twice_is_one_object(tmp_path):
    t = torch.randn(3)
    a = np.arange(3)
    out = roundtrip({"x": [t, t], "y": (t, a), "z": a}, tmp_path)
    assert out["x"][0] is out["x"][1] is out["y"][0]
    assert out["y"][1] is out["z"]
    assert torch.equal(out["x"][0], t)


def test_small_view_of_large_tensor_writes_only_its_bytes(tmp_path):
    big = torch.zeros(4 << 20, dtype=torch.uint8)  # 4 MiB
    big[1000:1010] = torch.arange(1, 11, dtype=torch.uint8)
    view = big[1000:1010]
    path = tmp_path / "view.tf"
    tensorfile.save({"v": view}, path)
    assert os.path.getsize(path) < 3 * 4096
    out = tensorfile.load(path)["v"]
    assert torch.equal(out, view) and out.untyped_storage().nbytes() < 4096


def test_small_view_of_large_array_writes_only_its_bytes(tmp_path):
    big = np.zeros(1 << 20)  # 8 MiB
    big[500:505] = [1, 2, 3, 4, 5]
    path = tmp_path / "view.tf"
    tensorfile.save({"v": big[500:505], "w": big[-3:]}, path)
    assert os.path.getsize(path) < 4 * 4096
    out = tensorfile.load(path)
    np.testing.assert_array_equal(out["v"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["w"], [0, 0, 0])


# --------------------------------------------------------------------------- numpy


def _np_random(dtype, n, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw %= 2
    return raw.view(dtype)


@pytest.mark.parametrize("name", sorted(NUMPY_ITEMSIZE))
def test_every_numpy_dtype_and_layout(tmp_path, name):
    base = _np_random(name, 60, seed=len(name))
    m = base.reshape(6, 10)
    raw = np.arange(256, dtype=np.uint8)
    item = np.dtype(name).itemsize
    odd = np.ndarray(shape=(5,), dtype=name, buffer=raw, offset=1, strides=(2 * item + 1,))
    odd = odd if name != "bool" else (odd.view(np.uint8) % 2).view(bool)
    cases = {
        "dense": m,
        "reversed": base[::-1],
        "neg-step": base[::-3],
        "2d-neg": m[::-2, 7:1:-2],
        "transposed": m.T,
        "fortran": np.asfortranarray(m),
        "odd-unaligned": odd,
        "zero-d": np.array(base[0]),
        "empty": base[5:5],
        "empty-2d-neg": m[::-1, 3:3],
        "broadcast": np.broadcast_to(base[:4], (3, 4)),
    }
    out = roundtrip(cases, tmp_path)
    assert list(out) == list(cases)
    for k, a in cases.items():
        assert_array_same(a, out[k], k)


def test_numpy_overlapping_views_share(tmp_path):
    base = np.arange(20, dtype=np.float64)
    a, b, c = base[2:12], base[10:2:-2], base[15:]
    out = roundtrip([a, b, c], tmp_path)
    assert np.shares_memory(out[0], out[1])
    assert not np.shares_memory(out[0], out[2])
    out[0][8] = -1.0  # base[10] is b[0]
    assert out[1][0] == -1.0


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_numpy_empty_view_keeps_sharing(tmp_path, order):
    # An empty view whose address lies inside another array must not split the arrays
    # that do share memory into separate storages.
    x = np.arange(10.0)
    arrays = [x, x[3:][:0], x[3:5]]
    assert np.shares_memory(x, arrays[2])
    saved = [arrays[i] for i in order]
    out = roundtrip(saved, tmp_path)
    ix, iv = order.index(0), order.index(2)
    for a, b in zip(saved, out):
        assert_array_same(a, b)
    assert np.shares_memory(out[ix], out[iv])
    out[ix][3] = -1.0
    assert out[iv][0] == -1.0


def test_numpy_alignment_survives_sharing(tmp_path):
    # Arrays that share memory with an array starting at an odd address are stored in one
    # region that starts there; the aligned int64 array must still load aligned (the
    # torch side rounds a region's start down to 16 bytes for this reason).
    raw = np.zeros(64, dtype=np.uint8)
    a = raw[1:20]
    b = raw[8:16].view(np.int64)
    assert b.flags.aligned and np.shares_memory(a, b)
    for kwargs in ({}, {"mmap": True}):
        out = roundtrip([a, b], tmp_path, **kwargs)
        assert np.shares_memory(out[0], out[1])
        assert out[1].flags.aligned


def test_readonly_array(tmp_path):
    a = np.arange(5)
    a.setflags(write=False)
    out = roundtrip(a, tmp_path)
    np.testing.assert_array_equal(out, a)


def test_numpy_scalars(tmp_path):
    values = [
        np.float16(1.5),
        np.float32(-0.0),
        np.float64("nan"),
        np.int8(-3),
        np.int64(-(2**63)),
        np.uint64(2**64 - 1),
        np.uint8(255),
        np.bool_(True),
        np.bool_(False),
        np.complex64(1 - 2j),
        np.complex128(complex("inf-0j")),
    ]
    out = roundtrip(values, tmp_path)
    assert_same(values, out)


def test_numpy_scalar_dict_keys(tmp_path):
    d = {np.int32(3): "a", np.float64(0.5): "b"}
    out = roundtrip(d, tmp_path)
    assert_same(d, out)


# --------------------------------------------------------------------------- plain values

PLAIN = [
    None,
    True,
    False,
    0,
    -1,
    2**53,
    -(2**53),
    2**53 + 1,
    -(2**53) - 1,
    2**100,
    -(2**70),
    10**1000,
    0.0,
    -0.0,
    1.5,
    1e308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    1 + 2j,
    complex(float("nan"), -0.0),
    complex(float("inf"), float("-inf")),
    "",
    "plain",
    "unicode: é ☃ 日本 😀 \x00 \u2028",
    "lone surrogates: \ud800 \udfff",
    b"",
    bytes(range(256)),
    bytearray(b"\x00mutable\xff"),
    torch.float32,
    torch.bfloat16,
    torch.bool,
    torch.Size([]),
    torch.Size([2, 0, 3]),
    torch.device("cpu"),
    torch.device("cuda", 1),
    torch.device("cuda"),
]


@pytest.mark.parametrize(
    "value", PLAIN, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(PLAIN)]
)
def test_plain_value(tmp_path, value):
    out = roundtrip({"v": value}, tmp_path)["v"]
    assert_same(value, out)


def test_all_plain_values_together(tmp_path):
    out = roundtrip(PLAIN, tmp_path)
    assert_same(PLAIN, out)
    i = next(
        i for i, v in enumerate(PLAIN) if type(v) is float and v == 0 and math.copysign(1, v) < 0
    )
    assert math.copysign(1.0, out[i]) == -1.0  # -0.0 kept its sign


@pytest.mark.parametrize(
    "text",
    ["\ud83d\ude00", "a\ud800\ud800\udc00b"],
    ids=["emoji-halves", "lone-then-pair"],
)
@pytest.mark.parametrize("where", ["value", "key", "metadata"])
def test_adjacent_surrogates(tmp_path, text, where):
    # A str holding a high surrogate then a low one is two code points, not the astral
    # character they would encode in UTF-16. It must come back as those code points;
    # refusing it at save is acceptable, silently turning it into another string is not.
    assert len(text) >= 2
    path = tmp_path / "s.tf"
    obj = {"v": text} if where == "value" else ({text: 1} if where == "key" else {})
    meta = {"m": text} if where == "metadata" else None
    try:
        tensorfile.save(obj, path, metadata=meta)
    except TypeError:
        return
    if where == "metadata":
        with tensorfile.open(path) as f:
            got = f.metadata()["m"]
    else:
        out = tensorfile.load(path)
        got = out["v"] if where == "value" else next(iter(out))
    assert got == text, f"{text!r} came back as {got!r}"


def test_dict_keys_and_order(tmp_path):
    d = {
        "z": 1,
        3: "int",
        -(2**80): "big int",
        (1, "a", (2.5, None)): "tuple",
        2.5: "float",
        None: "none",
        True: "bool",
        b"k": "bytes",
        1j: "complex",
        float("inf"): "inf",
        torch.float16: "dtype",
        "a": 2,
    }
    out = roundtrip(d, tmp_path)
    assert list(out) == list(d)
    assert [type(k) for k in out] == [type(k) for k in d]
    assert_same(d, out)


def test_ordered_dict_and_state_dict_metadata(tmp_path):
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    sd = net.state_dict()
    assert hasattr(sd, "_metadata")
    od = collections.OrderedDict([("b", 1), ("a", 2)])
    out = roundtrip({"sd": sd, "od": od, "plain": {"b": 1, "a": 2}}, tmp_path)
    assert type(out["sd"]) is collections.OrderedDict
    assert type(out["od"]) is collections.OrderedDict
    assert type(out["plain"]) is dict
    assert list(out["od"].items()) == [("b", 1), ("a", 2)]
    assert out["sd"]._metadata == sd._metadata
    assert not hasattr(out["od"], "_metadata")
    assert_same(sd, out["sd"])
    clone = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    clone.load_state_dict(out["sd"])


def test_tuples_and_lists_stay_apart(tmp_path):
    obj = [(), [], {}, (1,), [1], ((1, 2), [3, (4,)]), [[], ()]]
    out = roundtrip(obj, tmp_path)
    assert_same(obj, out)


@pytest.mark.parametrize("depth", [100, 190])
def test_deep_nesting(tmp_path, depth):
    obj = torch.arange(3)
    for i in range(depth):
        obj = [obj] if i % 3 == 0 else ({"k": obj} if i % 3 == 1 else (obj,))
    out = roundtrip(obj, tmp_path)
    assert_same(obj, out)


def test_metadata(tmp_path):
    path = tmp_path / "m.tf"
    meta = {"framework": "torch", "note": "é ☃", "": ""}
    tensorfile.save({"x": torch.ones(2)}, path, metadata=meta)
    with tensorfile.open(path) as f:
        assert f.metadata() == meta
    tensorfile.save({"x": torch.ones(2)}, path)
    with tensorfile.open(path) as f:
        assert f.metadata() == {}


@pytest.mark.parametrize("bad", [{"a": 1}, {1: "a"}, [("a", "b")], "a=b"])
def test_metadata_must_be_str_to_str(tmp_path, bad):
    with pytest.raises(TypeError, match="metadata"):
        tensorfile.save({}, tmp_path / "m.tf", metadata=bad)
    assert not (tmp_path / "m.tf").exists()


def test_objects_without_tensors(tmp_path):
    for obj in [None, 1, "s", [], {}, {"a": [1, 2.5, None]}]:
        assert_same(obj, roundtrip(obj, tmp_path))


def test_save_over_existing_file_and_without_durability(tmp_path):
    path = tmp_path / "f.tf"
    tensorfile.save(torch.zeros(3), path)
    tensorfile.save(torch.ones(3), path, durable=False)
    assert torch.equal(tensorfile.load(path), torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["f.tf"]


def test_str_path_and_pathlike(tmp_path):
    tensorfile.save([1, torch.ones(1)], str(tmp_path / "s.tf"))
    out = tensorfile.load(str(tmp_path / "s.tf"))
    assert out[0] == 1 and torch.equal(out[1], torch.ones(1))


# --------------------------------------------------------------------------- threads and tasks


def _mixed_checkpoint():
    g = torch.Generator().manual_seed(7)
    small = {f"s{i}": torch.randn(i % 37 + 1, generator=g) for i in range(150)}
    large = {
        "l0": torch.randn(300 << 8, generator=g),  # 300 KiB
        "l1": torch.randint(0, 2**31, ((1 << 18) + 3,), dtype=torch.int32, generator=g),
        "l2": torch.randn(700, 900, generator=g).t(),  # ~2.4 MiB, strided
    }
    arrays = {
        "np_small": np.arange(11, dtype=np.int16),
        "np_large": np.random.default_rng(3).standard_normal(100_000)[::-1],
    }
    return {"small": small, "large": large, "arrays": arrays, "step": 12}


@pytest.mark.parametrize(
    "task_nbytes", ["4096", "65536", None], ids=["task4K", "task64K", "task-default"]
)
@pytest.mark.parametrize("num_threads", [1, 2, 4])
def test_threads_and_task_sizes(tmp_path, monkeypatch, num_threads, task_nbytes):
    if task_nbytes is None:
        monkeypatch.delenv("TENSORFILE_TASK_NBYTES", raising=False)
    else:
        monkeypatch.setenv("TENSORFILE_TASK_NBYTES", task_nbytes)
    obj = _mixed_checkpoint()
    path = tmp_path / "mixed.tf"
    tensorfile.save(obj, path, num_threads=num_threads, durable=False)
    assert_same(obj, tensorfile.load(path, num_threads=num_threads))
    # any reader configuration reads any writer's file
    monkeypatch.setenv("TENSORFILE_TASK_NBYTES", "8192")
    assert_same(obj, tensorfile.load(path, num_threads=3))
    assert_same(obj, tensorfile.load(path, mmap=True))


def test_num_threads_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORFILE_NUM_THREADS", "3")
    obj = _mixed_checkpoint()
    tensorfile.save(obj, tmp_path / "e.tf", durable=False)
    assert_same(obj, tensorfile.load(tmp_path / "e.tf"))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_num_threads(tmp_path, bad):
    with pytest.raises(ValueError, match="num_threads"):
        tensorfile.save(torch.ones(2), tmp_path / "t.tf", num_threads=bad)
    tensorfile.save(torch.ones(2), tmp_path / "t.tf")
    with pytest.raises(ValueError, match="num_threads"):
        tensorfile.load(tmp_path / "t.tf", num_threads=bad)


# --------------------------------------------------------------------------- streams and mmap


def _stream_obj():
    return {
        "a": torch.arange(5, dtype=torch.int32),
        "b": torch.randn(100_000),  # > 256 KiB
        "c": np.arange(7.0)[::-1],
        "shared": [torch.arange(6.0)] * 2,
        "empty": torch.empty(0),
        "n": 3,
    }


def test_bytesio(tmp_path):
    obj = _stream_obj()
    buf = io.BytesIO()
    tensorfile.save(obj, buf)
    data = buf.getvalue()
    path = tmp_path / "p.tf"
    tensorfile.save(obj, path)
    assert data == path.read_bytes()  # a stream gets exactly the bytes a path gets
    buf.seek(0)
    assert_same(obj, tensorfile.load(buf))
    assert_same(obj, tensorfile.load(io.BytesIO(data), verify=False))


def test_binary_file_objects(tmp_path):
    obj = _stream_obj()
    path = tmp_path / "f.tf"
    with open(path, "wb") as f:
        tensorfile.save(obj, f)
    with open(path, "rb") as f:
        assert_same(obj, tensorfile.load(f))
    assert_same(obj, tensorfile.load(path))


def test_mmap(tmp_path):
    obj = _stream_obj()
    path = tmp_path / "m.tf"
    tensorfile.save(obj, path)
    before = path.read_bytes()
    out = tensorfile.load(path, mmap=True)
    assert_same(obj, out)
    out["a"][0] = 100  # a private, copy-on-write mapping
    out["c"][0] = -1.0
    assert path.read_bytes() == before
    assert_same(obj, tensorfile.load(path, mmap=True))


def test_mmap_needs_a_path():
    buf = io.BytesIO()
    tensorfile.save(torch.ones(2), buf)
    buf.seek(0)
    with pytest.raises(ValueError):
        tensorfile.load(buf, mmap=True)


def test_load_rejects_non_files(tmp_path):
    with pytest.raises(TypeError):
        tensorfile.load(12345.5)
    with pytest.raises(FileNotFoundError):
        tensorfile.load(tmp_path / "missing.tf")


def test_load_of_a_directory_raises_is_a_directory(tmp_path):
    # as torch.load does, and as tensorfile.save does for a directory target
    with pytest.raises(IsADirectoryError):
        tensorfile.load(tmp_path)


# --------------------------------------------------------------------------- empty storages

EMPTY_CASES = {
    "torch-last": [torch.arange(3, dtype=torch.int32), torch.empty(0)],
    "numpy-last": [np.arange(3), np.empty(0)],
    "bias-last": {"w": torch.randn(2, 3), "b": torch.zeros(0)},
    "torch-middle": [torch.arange(3), torch.empty(0), torch.arange(4.0)],
    "torch-first": [torch.empty(0), torch.arange(3)],
    "only-empty": [torch.empty(0), np.empty((0, 3))],
    "large-then-empty": [torch.randn(100_000), torch.empty(0)],
}


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_tensors_among_others(tmp_path, name):
    obj = EMPTY_CASES[name]
    path = tmp_path / "e.tf"
    tensorfile.save(obj, path)
    assert_same(obj, tensorfile.load(path))
    assert_same(obj, tensorfile.load(path, mmap=True))
    buf = io.BytesIO()
    tensorfile.save(obj, buf)
    assert buf.getvalue() == path.read_bytes()


# --------------------------------------------------------------------------- open()


def _checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 1, "arr": np.ones(3)}


def _key_paths(obj, prefix=""):
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return [prefix]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    out = []
    for k, v in items:
        out += _key_paths(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def test_open_keys_get_metadata_load(tmp_path):
    ckpt = _checkpoint()
    path = tmp_path / "ckpt.tf"
    tensorfile.save(ckpt, path, metadata={"epoch": "1"})
    with tensorfile.open(path) as f:
        keys = f.keys()
        assert keys == _key_paths(ckpt)
        assert keys[:4] == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
        for name in (
            "optim.state.0.exp_avg",
            "optim.state.0.exp_avg_sq",
            "optim.state.3.step",
            "arr",
        ):
            assert name in keys and name in f
        assert len(f) == len(keys) and list(f) == keys
        assert_tensor_same(ckpt["model"]["2.weight"], f.get("model.2.weight"))
        assert_tensor_same(ckpt["optim"]["state"][0]["exp_avg"], f.get("optim.state.0.exp_avg"))
        assert_array_same(ckpt["arr"], f.get("arr"))
        assert_tensor_same(ckpt["model"]["0.bias"], f.get("model.0.bias", map_location="cpu"))
        assert f.metadata() == {"epoch": "1"}
        with pytest.raises(KeyError, match=r"model\.9\.weight"):
            f.get("model.9.weight")
        with pytest.raises(KeyError):
            f.get("epoch")  # a plain value, not a tensor
        assert_same(ckpt, f.load())
        assert_same(ckpt, f.load())  # more than once


def test_open_key_paths_of_non_string_keys(tmp_path):
    t = [torch.full((1,), float(i)) for i in range(5)]
    obj = {"a": {0: t[0], (1, "a"): t[1], None: t[2], b"k": t[3]}, "l": [np.zeros(1), t[4]]}
    path = tmp_path / "k.tf"
    tensorfile.save(obj, path)
    with tensorfile.open(path) as f:
        assert f.keys() == ["a.0", "a.(1, 'a')", "a.None", "a.b'k'", "l.0", "l.1"]
        assert f.get("a.(1, 'a')").item() == 1.0
    tensorfile.save(t[0], path)  # a tensor at the root has the empty path
    with tensorfile.open(path) as f:
        assert f.keys() == [""]
        assert torch.equal(f.get(""), t[0])


def test_open_get_shared_views(tmp_path):
    base = torch.arange(12.0)
    obj = {"a": base[:4], "b": base.view(3, 4)[1:, ::2], "c": torch.ones(2)}
    path = tmp_path / "v.tf"
    tensorfile.save(obj, path)
    with tensorfile.open(path) as f:
        for k in obj:
            assert_tensor_same(obj[k], f.get(k), k)


def test_open_close_without_context_manager(tmp_path):
    path = tmp_path / "c.tf"
    tensorfile.save({"x": torch.ones(3)}, path)
    f = tensorfile.open(path)
    try:
        assert f.keys() == ["x"]
    finally:
        f.close()


def test_open_on_a_stream_reads_any_key(tmp_path):
    obj = {"a": torch.arange(3), "b": torch.arange(5.0), "c": np.arange(4)}
    buf = io.BytesIO()
    tensorfile.save(obj, buf)
    for key in obj:
        with tensorfile.open(io.BytesIO(buf.getvalue())) as f:
            assert f.keys() == ["a", "b", "c"]
            assert_same(obj[key], f.get(key))


# --------------------------------------------------------------------------- map_location


def _sample():
    return {"t": torch.arange(4.0), "p": nn.Parameter(torch.ones(2)), "n": np.arange(3)}


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}],
    ids=["none", "str", "device", "dict", "dict-unrelated"],
)
def test_map_location_cpu(tmp_path, map_location):
    obj = _sample()
    out = roundtrip(obj, tmp_path, map_location=map_location)
    assert_same(obj, out)
    assert out["t"].device.type == "cpu"


@pytest.mark.parametrize("mmap", [False, True])
def test_map_location_callable(tmp_path, mmap):
    calls = []

    def keep(storage, location):
        calls.append(location)
        assert isinstance(storage, torch.UntypedStorage)  # as torch.load passes it
        return storage

    obj = _sample()
    assert_same(obj, roundtrip(obj, tmp_path, map_location=keep, mmap=mmap))
    assert calls and set(calls) == {"cpu"}
    # None from the callable means "the default placement"
    assert_same(obj, roundtrip(obj, tmp_path, map_location=lambda s, loc: None))


def test_map_location_callable_can_substitute(tmp_path):
    def zeroed(storage, location):
        out = torch.UntypedStorage(storage.nbytes())
        out.copy_(storage)
        out.fill_(0)
        return out

    out = roundtrip({"t": torch.arange(1.0, 5.0)}, tmp_path, map_location=zeroed)
    assert torch.equal(out["t"], torch.zeros(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("map_location", ["cuda", "cuda:0", torch.device("cuda"), {"cpu": "cuda"}])
def test_map_location_cuda_without_cuda(tmp_path, map_location):
    path = tmp_path / "c.tf"
    tensorfile.save({"t": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="CUDA") as e:
        tensorfile.load(path, map_location=map_location)
    assert str(path) in str(e.value)


def test_map_location_does_not_touch_numpy(tmp_path):
    out = roundtrip({"n": np.arange(3)}, tmp_path, map_location="cuda")
    np.testing.assert_array_equal(out["n"], np.arange(3))


def test_sharing_pattern_helper_sanity():
    base = torch.arange(4)
    a = np.arange(4)
    objs = [base, base[1:], base, torch.arange(4), a, a[::-1], np.arange(2)]
    assert sharing_pattern(objs) == {
        (0, 1, "storage"),
        (0, 2, "same object"),
        (0, 2, "storage"),
        (1, 2, "storage"),
        (4, 5, "memory"),
    }
    assert leaves({"x": [base, (a,)], "y": 1}) == [base, a]
    assert tensor_bytes(torch.tensor([1, 2], dtype=torch.int16)) == b"\x01\x00\x02\x00"
