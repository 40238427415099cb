"""The engine's header decoder against the reference validator in formats/native.py.

The decoder may decline any header (the reference then decides), but whatever it
accepts the reference must accept too, with an identical Layout. These tests check
that it covers the headers tensorfile writes, and that it never accepts a header the
reference refuses, over thousands of mutated headers.
"""

from __future__ import annotations

import collections
import json
import random
import re

import numpy as np
import pytest
import tensorfile
import torch
from tensorfile._errors import FormatError
from tensorfile.formats import Layout, layout_difference, native


def _header(path):
    raw = path.read_bytes()
    pre = native.parse_preamble(raw[:32], len(raw), str(path))
    return raw[32 : 32 + pre.header_nbytes], pre


def _same_layout(a: Layout, b: Layout) -> None:
    assert layout_difference(a, b) is None


def _rich():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    od = collections.OrderedDict(w=torch.ones(2, dtype=torch.bfloat16), n=3)
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    return {
        "model": {"w": base, "t": base.t(), "row": base[1], "p": torch.nn.Parameter(torch.ones(3))},
        "grad": torch.zeros(2, requires_grad=True),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "np": arr,
        "np_rev": arr[::-1, ::2],
        "np_empty": np.zeros((0, 3), dtype=np.float16),
        "opt": {"state": {0: {"step": 10, "m": torch.zeros(3)}, -1: None}, "lr": 1e-3},
        "od": od,
        "items": [1, 2.5, -0.0, True, False, None, "text", (1, "a", [torch.ones(1)])],
        "big": 2**53,
        "same": base,
    }


OBJECTS = {
    "rich": _rich,
    "many": lambda: {f"t{i}": torch.randn(i % 7 + 1) for i in range(300)},
    "empty_dict": dict,
    "one_numpy": lambda: np.arange(5, dtype=np.uint8),
    "only_scalars": lambda: {"a": 1, "b": [None, "x"]},
}


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_decoder_covers_what_save_writes(tmp_path, name):
    path = tmp_path / "f.tf"
    tensorfile.save(OBJECTS[name](), path, metadata={"k": "v", "step": "3"})
    header, pre = _header(path)
    fast = native.decode_fast(header, pre)
    assert fast is not None, "the engine declined a header that tensorfile itself wrote"
    _same_layout(fast, native.parse_header_reference(header, pre, str(path)))


def test_layouts_that_differ_are_told_apart(tmp_path):
    # The comparison behind these tests and the fuzzer: rows built on demand by the
    # engine's decoder are compared by their items, and one changed value is found.
    path = tmp_path / "f.tf"
    tensorfile.save(OBJECTS["many"](), path, metadata={"k": "v"})
    header, pre = _header(path)
    ref = native.parse_header_reference(header, pre, str(path))
    for field, change in (
        (
            "tensors",
            lambda lay: lay.tensors._all().__setitem__(
                1, lay.tensors[1]._replace(offset=lay.tensors[1].offset + 4)
            ),
        ),
        ("storage_tensors", lambda lay: lay.storage_tensors[0].append(99)),
        ("storage_crcs", lambda lay: lay.storage_crcs.__setitem__(0, lay.storage_crcs[0] ^ 1)),
        ("metadata", lambda lay: lay.metadata.__setitem__("x", "y")),
    ):
        fast = native.decode_fast(header, pre)
        assert layout_difference(fast, ref) is None
        change(fast)
        assert layout_difference(fast, ref) == field


def test_decoder_declines_unusual_but_valid_headers(tmp_path):
    # Whitespace, escapes and rare node types are left to the reference, which accepts.
    path = tmp_path / "f.tf"
    tensorfile.save({"k\u00e9y": torch.ones(2), "s": torch.Size([2]), 1.5: 2}, path)
    header, pre = _header(path)
    assert native.decode_fast(header, pre) is None
    loaded = tensorfile.load(path)
    assert loaded["s"] == torch.Size([2]) and loaded[1.5] == 2


_TOKEN = re.compile(rb'"[^"\\]*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null')
_REPLACEMENTS = [
    b"0", b"1", b"-1", b"2", b"3", b"4", b"7", b"16", b"4096", b"-0", b"1.0", b"1e3",
    b"9007199254740992", b"9007199254740993", b"-9007199254740993", b"9223372036854775807",
    b"9223372036854775808", b"99999999999999999999", b"1e400", b"null", b"true", b"false",
    b'"torch"', b'"numpy"', b'"float32"', b'"int64"', b'"bool"', b'"cpu"', b'"cuda:1"',
    b'"cuda:01"', b'"tensor"', b'"ndarray"', b'"list"', b'"dict"', b'"odict"', b'"w"',
    b'"step"', b'"x"', b"[]", b"{}", b'["list"]', b'["tensor",0]', b'["ndarray",0]',
    b"[1]", b"[0]", b"[-1]", b'"0"', b'"00000000"',
]  # fmt: skip


def _mutations(header: bytes, rng: random.Random, count: int):
    tokens = [m.span() for m in _TOKEN.finditer(header)]
    for _ in range(count):
        roll = rng.random()
        if roll < 0.7:
            a, b = rng.choice(tokens)
            yield header[:a] + rng.choice(_REPLACEMENTS) + header[b:]
        elif roll < 0.85:
            at = rng.randrange(len(header))
            yield header[:at] + bytes([rng.choice(b'[]{},:"-0159ae \\')]) + header[at + 1 :]
        else:
            a, b = sorted(rng.sample(range(len(header)), 2))
            yield header[:a] + header[b:]  # a cut: drops a span of tokens


def test_decoder_never_accepts_what_the_reference_refuses(tmp_path):
    path = tmp_path / "f.tf"
    tensorfile.save(_rich(), path, metadata={"k": "v"})
    header, pre = _header(path)
    data_end = pre.file_nbytes - native.data_start(pre.header_nbytes)
    rng = random.Random(1234)
    accepted = refused = 0
    for mutated in _mutations(header, rng, 4000):
        total = native.data_start(len(mutated)) + data_end
        mpre = native.Preamble(1, 0, 0, len(mutated), total)
        fast = native.decode_fast(mutated, mpre)
        try:
            ref = native.parse_header_reference(mutated, mpre, "f.tf")
        except FormatError:
            assert fast is None, f"the engine accepted a header the reference refuses: {mutated!r}"
            refused += 1
            continue
        if fast is not None:
            _same_layout(fast, ref)
            accepted += 1
    # Both outcomes must be well represented, or the campaign proves little.
    assert accepted > 200 and refused > 2000, (accepted, refused)


def test_decoder_agrees_on_token_edits_of_every_table(tmp_path):
    # Each number of a small header set to each interesting value, exhaustively.
    path = tmp_path / "f.tf"
    tensorfile.save({"a": torch.arange(3), "b": np.arange(4, dtype=np.int16)[::-1]}, path)
    header, pre = _header(path)
    data_end = pre.file_nbytes - native.data_start(pre.header_nbytes)
    for m in _TOKEN.finditer(header):
        for rep in _REPLACEMENTS:
            mutated = header[: m.start()] + rep + header[m.end() :]
            mpre = native.Preamble(
                1, 0, 0, len(mutated), native.data_start(len(mutated)) + data_end
            )
            fast = native.decode_fast(mutated, mpre)
            try:
                ref = native.parse_header_reference(mutated, mpre, "f.tf")
            except FormatError:
                assert fast is None, mutated
                continue
            if fast is not None:
                _same_layout(fast, ref)


def test_decoder_checks_the_recorded_file_size(tmp_path):
    path = tmp_path / "f.tf"
    tensorfile.save({"a": torch.ones(3)}, path)
    header, pre = _header(path)
    assert native.decode_fast(header, pre) is not None
    wrong = native.Preamble(1, 0, 0, pre.header_nbytes, pre.file_nbytes + 4096)
    assert native.decode_fast(header, wrong) is None


def test_decoder_tree_json_matches(tmp_path):
    path = tmp_path / "f.tf"
    tensorfile.save(_rich(), path)
    header, pre = _header(path)
    fast = native.decode_fast(header, pre)
    assert fast is not None and fast.tree == json.loads(header)["tree"]
