"""Loads and saves that take the batched paths (state dicts of many tensors, tensors
allocated before the read) give exactly what the general paths give."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorfile
import torch
from _util import assert_same


def _state():
    base = torch.arange(12, dtype=torch.float32)
    return {
        "w": torch.randn(4, 3),
        "p": torch.nn.Parameter(torch.ones(5)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "g": torch.zeros(3, requires_grad=True),
        "flag": torch.tensor([True, False]),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),
        "view_a": base[2:6],
        "view_b": base[4:],
        "empty": torch.empty(0, 3),
        "bits": torch.zeros(4, dtype=torch.uint8).view(torch.bits8),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "np": np.arange(3),
    }


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage],
    ids=["none", "str", "device", "dict", "callable"],
)
def test_every_map_location_loads_the_same(tmp_path, map_location):
    obj = _state()
    tensorfile.save(obj, tmp_path / "s.tf")
    out = tensorfile.load(tmp_path / "s.tf", map_location=map_location)
    assert_same(obj, out)
    # Tensors allocated before the read own a storage of exactly their bytes.
    assert out["w"].untyped_storage().nbytes() == out["w"].nbytes
    assert out["view_a"].untyped_storage().data_ptr() == out["view_b"].untyped_storage().data_ptr()
    with tensorfile.open(tmp_path / "s.tf") as f:
        assert_same(obj, f.load())
        assert_same(obj["p"], f.get("p"))


def test_many_tensors_with_repeats_and_nesting(tmp_path):
    shared = torch.ones(3)
    obj = {f"t{i}": torch.full((i % 5 + 1,), float(i)) for i in range(500)}
    obj["again"] = shared
    obj["same"] = shared
    obj["nested"] = collections.OrderedDict(a=torch.ones(1), b=shared)
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf")
    assert_same(obj, out)
    assert out["again"] is out["same"] and out["nested"]["b"] is out["same"]


def test_refusal_in_a_large_state_dict_names_its_key(tmp_path):
    obj = {f"t{i}": torch.ones(1) for i in range(100)}
    obj["t50"] = torch.empty(2, device="meta")
    with pytest.raises(TypeError, match=r"key path 't50': meta tensors"):
        tensorfile.save(obj, tmp_path / "bad.tf")
    with pytest.raises(TypeError, match=r"key path 'model\.t50': meta tensors"):
        tensorfile.save({"model": obj, "x": [torch.ones(1)]}, tmp_path / "bad.tf")
