"""The planner's vectorised path against describe() one tensor at a time: for every mix
of sharing, views, offsets, empty tensors and flags, both must give the same plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorfile import _plan


def _refuse(i, m):
    return TypeError(f"leaf {i}: {m}")


def _same(a: _plan.SavePlan, b: _plan.SavePlan) -> None:
    assert a.table.rows() == b.table.rows()
    assert a.devices == b.devices
    for field in ("ptrs", "nbytes", "offsets"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field


def _cases():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    other = torch.arange(40, dtype=torch.int16)
    bf = torch.ones(7, dtype=torch.bfloat16)
    z = torch.zeros(3, 4, dtype=torch.float64)
    return {
        "separate": [torch.randn(n) for n in (1, 5, 16, 17)],
        "views": [base, base[2:], base[:, 3], base.t(), base[1:3, 2:7], base[5, 9]],
        "tail_views": [base[4:], base[:1]],  # spans that start past the storage's start
        "unaligned_views": [other[3:9], base[1, 1:], bf[1:]],  # spans start on 16-byte bounds
        "shared_out_of_order": [other[10:20], bf, other[:5], other[30:], bf[3:]],
        "empty": [torch.empty(0), torch.empty(3, 0), base[6:], base[:, 10:], torch.ones(2)],
        "empty_only": [torch.empty(0), torch.empty(0, 2)],
        # No sharing, one tensor empty over memory it does not reach: its storage's address
        # comes from the storage itself.
        "separate_with_empty_view": [
            torch.ones(3),
            torch.ones(4)[4:],
            torch.ones(2, 0),
            torch.ones(2),
        ],
        "params": [torch.nn.Parameter(torch.ones(3)), torch.zeros(2, requires_grad=True), z],
        "frozen_param": [torch.nn.Parameter(torch.ones(2), requires_grad=False)],
        "scalars": [torch.tensor(3), torch.tensor(2.5), torch.tensor(True)],
        "ranks_1_0_2": [torch.ones(3), torch.tensor(2.0), torch.ones(2, 3)[:, 1:]],
        "same_rank_empty": [torch.ones(2, 3), torch.empty(0, 4), torch.ones(5, 1)],
        "expanded": [torch.ones(1, 4).expand(5, 4), torch.ones(3)[:, None]],
        "complex": [torch.randn(3, dtype=torch.complex64)],
        "dtypes": [
            torch.ones(2, dtype=d) for d in (torch.uint8, torch.int64, torch.float16, torch.bool)
        ],
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_vectorised_plan_matches_describe(name):
    leaves = _cases()[name]
    torch_mod = torch
    fast = _plan._describe_all(torch_mod, leaves)
    assert fast is not None, "the common case fell back to describe()"
    slow = _plan._plan_rows(torch_mod, leaves, list(range(len(leaves))), _refuse)
    _same(fast.finish(), slow.finish())
    _same(_plan.plan_save(leaves, _refuse), slow.finish())


def test_mixed_numpy_and_torch_matches_describe():
    arr = np.arange(24, dtype=np.int32).reshape(4, 6)
    t = torch.arange(10, dtype=torch.float32)
    leaves = [arr, t, arr[1:], t[3:], np.zeros(0), torch.ones(2), arr[::-1]]
    slow = _plan._plan_rows(torch, leaves, list(range(len(leaves))), _refuse)
    _same(_plan.plan_save(leaves, _refuse), slow.finish())


_UNUSUAL = {
    "conj": lambda: torch.randn(3, dtype=torch.complex64).conj(),
    "neg": lambda: torch._neg_view(torch.ones(2)),
    "sparse_coo": lambda: torch.eye(3).to_sparse(),
    "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
    "sparse_bsc": lambda: torch.eye(3).to_sparse_bsc((1, 1)),
    "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    "mkldnn": lambda: torch.eye(3).to_mkldnn(),
    "meta": lambda: torch.empty(2, device="meta"),
    "quantized": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR and nested tensors are beta
@pytest.mark.parametrize("name", sorted(_UNUSUAL))
def test_unusual_tensors_take_the_per_tensor_path(name):
    """The fast path reads no layout: every layout but strided has no storage, and so
    no data pointer, which sends the list down the per-tensor path."""
    if name == "mkldnn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no mkldnn")
    leaf = _UNUSUAL[name]()
    assert _plan._describe_all(torch, [torch.ones(2), leaf]) is None


def test_many_tensors_with_shared_storages_match_describe():
    """A few hundred tensors, views of a handful of storages in shuffled order, with
    zero-size and scalar views among them: the engine's grouping against describe()."""
    rng = np.random.default_rng(7)
    bases = [torch.arange(int(n), dtype=torch.float32) for n in rng.integers(1, 300, 12)]
    leaves = []
    for _ in range(400):
        b = bases[int(rng.integers(len(bases)))]
        lo = int(rng.integers(0, b.numel() + 1))
        hi = int(rng.integers(lo, b.numel() + 1))
        v = b[lo:hi]
        if hi > lo and rng.random() < 0.2:
            v = v[0]  # a 0-d view
        leaves.append(v)
    leaves += bases[::3]
    slow = _plan._plan_rows(torch, leaves, list(range(len(leaves))), _refuse)
    fast = _plan._describe_all(torch, leaves)
    assert fast is not None
    _same(fast.finish(), slow.finish())


def test_refusals_keep_their_messages():
    with pytest.raises(TypeError, match="leaf 1: meta tensors have no data"):
        _plan.plan_save([torch.ones(2), torch.empty(2, device="meta")], _refuse)
    with pytest.raises(TypeError, match="leaf 0: numpy dtype >i4"):
        _plan.plan_save([np.zeros(2, dtype=">i4"), torch.ones(1)], _refuse)
