"""The engine's JSON encoder for the header's object tree and metadata against
json.dumps with the separators, ASCII escaping and NaN refusal the format uses: the
bytes must be identical for every value the flattener can produce."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorfile import _engine

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
