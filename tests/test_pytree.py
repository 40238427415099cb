"""The engine's helpers for the flattener: the JSON encoder for the header's object tree
and metadata against json.dumps with the separators, ASCII escaping and NaN refusal the
format uses (the bytes must be identical for every value the flattener can produce), and
the one-pass items of a dict of tensors against the walk it stands in for."""

from __future__ import annotations

import json

import pytest
import tensorfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorfile import _engine
from tensorfile._tree import Flattener

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_DEPTH = 1000

# Lone surrogates, control characters, quotes, backslashes, DEL and astral characters
# all need escapes; plain printable ASCII takes the copying path.
_text = st.text(st.characters(codec=None, exclude_categories=())) | st.text(
    st.sampled_from('ab"\\\x00\x1f\x7f\u00e9\ud800\U0001f600 ')
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_trees = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(_trees)
def test_encoder_matches_json_dumps(tree):
    assert _engine.encode_tree(tree, _DEPTH) == _dumps(tree).encode("ascii")


def test_a_state_dict_tree_matches_json_dumps():
    tree = ["dict", *[x for i in range(2000) for x in (f"layer{i}.weight", ["tensor", i])]]
    assert _engine.encode_tree(tree, _DEPTH) == _dumps(tree).encode("ascii")


@pytest.mark.parametrize("bad", [float("nan"), [1, float("inf")], {"k": float("-inf")}])
def test_non_finite_floats_are_refused_as_json_refuses_them(bad):
    with pytest.raises(ValueError):
        _dumps(bad)
    with pytest.raises(ValueError, match="not JSON compliant"):
        _engine.encode_tree(bad, _DEPTH)


@pytest.mark.parametrize("bad", [b"x", object(), (1, 2), {1: "int key"}, [set()]])
def test_values_outside_the_tree_types_are_refused(bad):
    with pytest.raises(TypeError):
        _engine.encode_tree(bad, _DEPTH)


def test_nesting_past_the_limit_is_refused_not_a_crash():
    deep: list = []
    node = deep
    for _ in range(3000):
        node.append([])
        node = node[0]
    with pytest.raises(ValueError, match="nested too deeply"):
        _engine.encode_tree(deep, _DEPTH)
    assert _engine.encode_tree(deep, 4000).startswith(b"[[[")


def _items(d, first=0):
    return _engine.tensor_dict_items(
        list(d), list(d.values()), torch.Tensor, torch.nn.Parameter, first
    )


def test_dict_items_of_a_state_dict():
    a, p = torch.ones(2), torch.nn.Parameter(torch.zeros(1))
    assert _items({"a": a, "p": p}, first=5) == ["a", ["tensor", 5], "p", ["tensor", 6]]
    assert _items({}) == []


class _Name(str):
    pass


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "d",
    [
        {"a": torch.ones(1), "b": 3},  # a value that is no tensor
        {"a": torch.ones(1), "b": torch.ones(1).as_subclass(_Sub)},  # a tensor subclass
        {"a": torch.ones(1), 1: torch.ones(1)},  # a key that is no str
        {"a": torch.ones(1), "\u00e9": torch.ones(1)},  # a key that is not ASCII
        {"a": torch.ones(1), _Name("b"): torch.ones(1)},  # a str subclass key
    ],
    ids=["not_a_tensor", "subclass", "int_key", "non_ascii_key", "str_subclass_key"],
)
def test_dict_items_decline_what_the_walk_must_see(d):
    assert _items(d) is None


def test_dict_items_decline_a_tensor_listed_twice():
    t = torch.ones(3)
    assert _items({"a": t, "b": t}) is None


def test_a_tensor_of_a_state_dict_met_again_later_is_the_same_leaf(tmp_path):
    """The leaves of a state dict enter the id index only when a later leaf looks one
    up; a tensor that appears again (here in a list and in a second dict) must still be
    one leaf, and load back as one object."""
    sd = {f"w{i}": torch.full((2,), float(i)) for i in range(4)}
    obj = {"model": sd, "again": [sd["w2"], torch.ones(1)], "copy": {"x": sd["w1"], "y": sd["w3"]}}
    f = Flattener()
    f.flatten(obj)
    assert len(f.leaves) == 5
    tensorfile.save(obj, tmp_path / "c.tf")
    back = tensorfile.load(tmp_path / "c.tf")
    assert back["again"][0] is back["model"]["w2"]
    assert back["copy"]["x"] is back["model"]["w1"] and back["copy"]["y"] is back["model"]["w3"]
