"""Hostile torch.save and safetensors files: pickles and headers built to exhaust the
stack, the memory or the patience of a reader, and tensor records torch itself would
refuse. Each must load, or raise FormatError naming the file, in time and memory in
proportion to its size, and every reader (load, open, inspect, verify) must agree."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib

import pytest

torch = pytest.importorskip("torch")

import tensorfile  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tensorfile import FormatError, _safejson  # noqa: E402
from tensorfile.formats import torchzip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- crafting


def _u(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _zip(path, records, method=0, claimed=None):
    """A zip holding `records` ({name: bytes}) under archive/, every record stored
    (method 0) or deflated (8); `claimed` overrides a record's plain size in both
    headers. Built by hand, so the directory can say what zipfile would not write."""
    claimed = claimed or {}
    out = bytearray()
    central = bytearray()
    for name, body in records.items():
        full = f"archive/{name}".encode()
        if method == 8:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            data = c.compress(body) + c.flush()
        else:
            data = body
        data = claimed.get(name, (None, data))[1]
        usize = claimed.get(name, (len(body), None))[0]
        crc = zlib.crc32(body)
        local = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), usize, len(full), 0
        )
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            0,
            crc,
            len(data),
            usize,
            len(full),
            0,
            0,
            0,
            0,
            0,
            len(out),
        )
        central += full
        out += local + full + data
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), len(out), 0
    )
    path.write_bytes(bytes(out + central + eocd))
    return path


def _torch_file(path, pkl, storages=None, **kw):
    records = {"data.pkl": pkl, "byteorder": b"little", "version": b"3\n"}
    for key, body in (storages or {}).items():
        records[f"data/{key}"] = body
    return _zip(path, records, **kw)


def _tensor(
    stype="FloatStorage",
    numel=2,
    key="0",
    location="cpu",
    offset=b"K\x00",
    size=b"K\x02\x85",
    stride=b"K\x01\x85",
    requires_grad=b"\x89",
    meta=b"",
):
    """The opcodes of one _rebuild_tensor_v2 call, as torch.save writes it."""
    pid = (
        b"(" + _u("storage") + f"ctorch\n{stype}\n".encode() + _u(key) + _u(location)
        + b"J" + struct.pack("<i", numel) + b"tQ"
    )  # fmt: skip
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + offset + size + stride + requires_grad
        + b"ccollections\nOrderedDict\n)R" + meta + b"tR"
    )  # fmt: skip


def _dict_of(**tensors) -> bytes:
    body = b"".join(_u(k) + v for k, v in tensors.items())
    return b"\x80\x02}(" + body + b"u."


class _Ran:
    def __init__(self, result):
        self.returncode = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        # anything but the command's own exit would have printed a traceback
        self.crashed = not isinstance(result.exception, (SystemExit, type(None)))


def _cli(*args):
    """`tensorfile ARGS` run in this process (the command line as click runs it)."""
    from click.testing import CliRunner
    from tensorfile.cli import main

    return _Ran(CliRunner().invoke(main, [str(a) for a in args]))


def _refused_everywhere(path, match):
    """load, open, keys, get, verify and inspect all raise (or report) the same
    FormatError, naming the file; the CLI prints one line and no traceback."""
    with pytest.raises(FormatError, match=match) as e:
        tensorfile.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(FormatError, match=match):
        with tensorfile.open(path) as f:
            f.keys()
    for cmd in ("verify", "inspect"):
        r = _cli(cmd, path)
        out = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 1 and not r.crashed, (cmd, r.stdout, r.stderr)
        assert len(out) == 1 and str(path) in out[0], (cmd, out)


def _in_child(code: str, limit_gib: float | None = None, timeout: float = 300):
    """Runs `code` in a fresh interpreter (a crash there is a returncode, not a dead
    test run), optionally with its address space capped at what it uses after importing
    torch plus `limit_gib`."""
    prelude = textwrap.dedent(
        f"""
        import resource, sys, torch, tensorfile
        from tensorfile import FormatError
        limit = {limit_gib!r}
        if limit is not None:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            cap = used + int(limit * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# --------------------------------------------------------------------------- nesting


def test_a_key_tuple_nested_a_million_deep_is_refused_not_a_crash(tmp_path):
    # {((((...)))): None}: hashing the key recursed in C until the stack overflowed
    path = _torch_file(tmp_path / "deepkey.pt", b"\x80\x02}" + b")" + b"\x85" * 10**6 + b"Ns.")
    assert 10**6 < path.stat().st_size < 1.1 * 10**6
    r = _in_child(
        f"""
        path = {str(path)!r}
        for what, run in [
            ("load", lambda: tensorfile.load(path)),
            ("keys", lambda: tensorfile.open(path).keys()),
        ]:
            try:
                run()
                print(what, "loaded")
            except FormatError as e:
                print(what, "FormatError", e)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]  # -11 (SIGSEGV) before
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("FormatError" in x and "deepkey.pt" in x for x in lines)
    assert all("more than 200 deep" in x for x in lines)
    for cmd in ("verify", "inspect"):  # the command line, in a process of its own
        out = subprocess.run(
            [sys.executable, "-m", "tensorfile", cmd, str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 1 and "more than 200 deep" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "body",
    [
        # lists nested 100,000 deep
        b"\x80\x02" + b"]" * 10**5 + b"a" * (10**5 - 1) + b".",
        # a chain built by mutation: each list appended into the one memoized before it,
        # so no list is deep when it is made
        b"\x80\x02]q\x00"
        + b"".join(
            b"j" + struct.pack("<I", i) + b"]r" + struct.pack("<I", i + 1) + b"a0"
            for i in range(10**4)
        )
        + b"h\x00.",
        # frozensets hold their elements' hashes, but nest all the same
        b"\x80\x04" + b"(" * 10**4 + b")" + b"\x91" * 10**4 + b".",
        # a set element nested deep
        b"\x80\x04\x8f(" + b")" + b"\x85" * 10**4 + b"\x90.",
        # a deep key of an OrderedDict built from pairs
        b"\x80\x02ccollections\nOrderedDict\n)" + b"\x85" * 10**4 + b"N\x86\x85\x85R.",
    ],
    ids=["deep-list", "mutated-chain", "frozensets", "set-element", "odict-pairs"],
)
def test_every_structure_the_unpickler_builds_is_depth_bounded(tmp_path, body):
    path = _torch_file(tmp_path / "deep.pt", body)
    _refused_everywhere(path, "more than 200 deep")


def test_a_key_nested_a_million_deep_is_refused_at_level_201_not_walked_to_the_end():
    # the key measure goes depth first and gives up one level past the limit, so what it
    # holds while measuring is bounded by MAX_DEPTH, not by the key (a post-order walk
    # held a work item for each of the million tuples before it found the first too deep)
    import tracemalloc

    from tensorfile.formats.picklebounds import Budget

    key: tuple = ()
    for _ in range(10**6):
        key = (key,)
    budget = Budget(10**7)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="nests tuples more than 200 deep"):
            budget.check_key(key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # 200 frames; the million work items were about 70 MB


def test_a_key_of_shared_tuples_is_refused_before_it_is_hashed(tmp_path):
    # {t: None} with t = (t, t) 150 times over: 150 tuples, 2^150 paths through them.
    # Measuring it takes 150 steps; hashing it (torch.load included) would never end.
    shared = _torch_file(tmp_path / "shared.pt", b"\x80\x02}" + b")" + b"2\x86" * 150 + b"Ns.")
    value = _torch_file(tmp_path / "value.pt", b"\x80\x02]" + b")" + b"2\x86" * 150 + b"a.")
    # a dict whose key costs 2^19 visits to hash, copied into OrderedDicts 50,000 times:
    # each copy hashes the key again
    copied = _torch_file(
        tmp_path / "copied.pt",
        b"\x80\x02ccollections\nOrderedDict\nq\x00}"
        + b")"
        + b"2\x86" * 18
        + b"Nsq\x010]("
        + b"h\x00h\x01\x85R" * 50_000
        + b"e.",
    )
    r = _in_child(  # a child, so the old behaviour is a timeout rather than a hung run
        f"""
        for path in {[str(shared), str(value), str(copied)]!r}:
            for run in (tensorfile.load, lambda p: tensorfile.open(p).keys()):
                try:
                    run(path)
                    print("loaded")
                except FormatError as e:
                    print("FormatError", e)
        """,
        timeout=120,
    )
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 6, r.stderr[-2000:]
    for line in lines[:2]:
        assert "shared.pt" in line and re.search(r"hashing it would visit \d+ of them", line)
    for line in lines[4:]:
        assert "copied.pt" in line and "hashing it would visit 524287 of them" in line
    # as a value rather than a key it is 2^150 values to any reader that walks it as a
    # tree (listing its keys never ended)
    for line in lines[2:4]:
        assert "value.pt" in line and "unfold into more than" in line


def test_a_little_sharing_in_keys_still_loads(tmp_path):
    # (t, t) 8 times over: 511 tuples when unfolded, well inside the budget
    small = b"\x80\x02}" + b")" + b"2\x86" * 8 + b"Ns."
    (key,) = tensorfile.load(_torch_file(tmp_path / "small.pt", small))
    for _ in range(8):
        assert key[0] is key[1]
        key = key[0]
    assert key == ()
    # a key measured already (150 deep), then wrapped 100 more times in another key
    again = b"\x80\x02}" + b")" + b"\x85" * 149 + b"q\x00Ns}h\x00" + b"\x85" * 100 + b"Ns\x86."
    with pytest.raises(FormatError, match="nests tuples more than 200 deep"):
        tensorfile.load(_torch_file(tmp_path / "again.pt", again))


def test_nesting_at_the_limit_still_loads(tmp_path):
    # 200 lists: the innermost at depth 199 holding a tensor at depth 200
    pkl = b"\x80\x02" + b"]" * 200 + _tensor() + b"a" * 200 + b"."
    path = _torch_file(tmp_path / "ok.pt", pkl, {"0": struct.pack("<2f", 1, 2)})
    got = tensorfile.load(path)
    want = torch.load(path, weights_only=True)
    for _ in range(200):
        got, want = got[0], want[0]
    assert torch.equal(got, want)
    too_deep = _torch_file(tmp_path / "deep.pt", b"\x80\x02" + b"]" * 202 + b"a" * 201 + b".")
    with pytest.raises(FormatError, match="more than 200 deep"):
        tensorfile.load(too_deep)


# --------------------------------------------------------------------------- memo


def test_a_memo_index_of_2_29_costs_nothing(tmp_path):
    # 9 bytes: PROTO 2, NONE, LONG_BINPUT 2**29, STOP. The C unpickler zero-filled an
    # 8 GiB memo for it; under a 1 GiB cap that was a MemoryError.
    pkl = b"\x80\x02Nr" + struct.pack("<I", 2**29) + b"."
    assert len(pkl) == 9
    path = _torch_file(tmp_path / "memo.pt", pkl)
    r = _in_child(
        f"""
        print(repr(tensorfile.load({str(path)!r})))
        big = b"\\x80\\x02N" + b"r\\xff\\xff\\xff\\xff" + b"p4294967296000\\n0j\\xff\\xff\\xff\\xff."
        from tensorfile.formats import torchzip
        root, _, _ = torchzip.unpickle(big, torch, set(), "x")
        print(repr(root))
        """,
        limit_gib=1,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["None", "None"]


def test_memoized_objects_cannot_be_copied_without_end(tmp_path):
    # a 64 KiB bytes object memoized once, then a list of bytearray(it) 20,000 times:
    # 1.3 GB from a 200 KB pickle, refused once the copies outgrow the pickle
    call = b"h\x01h\x00\x85R"
    pkl = (
        b"\x80\x03B" + struct.pack("<I", 1 << 16) + bytes(1 << 16) + b"q\x00"
        b"c__builtin__\nbytearray\nq\x01](" + call * 20000 + b"e."
    )
    path = _torch_file(tmp_path / "copies.pt", pkl)
    r = _in_child(
        f"""
        try:
            tensorfile.load({str(path)!r})
            print("loaded")
        except FormatError as e:
            print("FormatError", e)
        """,
        limit_gib=1,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("FormatError") and "copies more" in r.stdout


# --------------------------------------------------------------------------- compression


def test_a_compressed_pickle_is_refused_as_documented(tmp_path):
    pkl = _dict_of(w=_tensor())
    storages = {"0": struct.pack("<2f", 1, 2)}
    plain = _torch_file(tmp_path / "plain.pt", pkl, storages)
    assert torch.equal(tensorfile.load(plain)["w"], torch.tensor([1.0, 2.0]))
    deflated = _torch_file(tmp_path / "deflated.pt", pkl, storages, method=8)
    with zipfile.ZipFile(deflated) as z:  # a well-formed zip that torch.load would read
        assert z.getinfo("archive/data.pkl").compress_type == zipfile.ZIP_DEFLATED
        assert z.read("archive/data.pkl") == pkl
    _refused_everywhere(deflated, r"'archive/data\.pkl' is compressed")


def test_a_deflate_bomb_is_refused_before_it_inflates(tmp_path):
    # 1 MB of deflate that inflates to 1 GiB, in a record that claims 162 bytes
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 24)) + c.flush(zlib.Z_FULL_FLUSH)  # the same each time
    bomb = block * 64 + c.flush()
    assert 10**6 < len(bomb) < 1.1 * 10**6
    path = _torch_file(tmp_path / "bomb.pt", b"", method=8, claimed={"data.pkl": (162, bomb)})
    r = _in_child(
        f"""
        try:
            tensorfile.load({str(path)!r})
            print("loaded")
        except FormatError as e:
            print("FormatError", e)
        """,
        limit_gib=0.5,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("FormatError") and "is compressed" in r.stdout


# --------------------------------------------------------------------------- records


def _storage(nbytes):
    return {"0": bytes(nbytes)}


@pytest.mark.parametrize(
    "tensor, nbytes, match, torch_refuses",
    [
        (_tensor("LongStorage", requires_grad=b"\x88"), 16, "int64 has requires_grad", True),
        (
            _tensor(offset=b"\x8a\x09" + (2**70).to_bytes(9, "little"), size=b"K\x00\x85"),
            8,
            "storage offset",
            True,
        ),
        # torch.load accepts this one (an empty tensor reads nothing); a tensorfile of it
        # would break the format's rule that a tensor lies inside its storage
        (_tensor(offset=b"K\x05", size=b"K\x00\x85"), 8, "empty tensor starts at byte 20", False),
        (_tensor(meta=b"}X\x04\x00\x00\x00conj\x88s"), 8, "float32 carries the conjugate", True),
        (
            _tensor(
                size=b"\x8a\x08" + (2**61).to_bytes(8, "little") + b"K\x08K\x00\x87",
                stride=b"K\x01K\x01K\x01\x87",
            ),
            8,
            "more elements",
            True,
        ),
    ],
    ids=["requires-grad-int64", "offset-2-70", "empty-offset-past-end", "conj-float32", "sizes"],
)
def test_records_torch_would_refuse_are_refused_by_every_reader(
    tmp_path, tensor, nbytes, match, torch_refuses
):
    path = _torch_file(tmp_path / "bad.pt", _dict_of(w=tensor), _storage(nbytes))
    if torch_refuses:
        with pytest.raises((RuntimeError, ValueError)):
            torch.load(path, weights_only=True)
    _refused_everywhere(path, match)
    r = _cli("convert", path, tmp_path / "out.tf")
    assert r.returncode == 1 and not (tmp_path / "out.tf").exists()


def test_parameter_with_requires_grad_on_int_is_refused(tmp_path):
    pkl = _dict_of(p=b"ctorch._utils\n_rebuild_parameter\n(" + _tensor("LongStorage") + b"\x88)tR")
    path = _torch_file(tmp_path / "param.pt", pkl, _storage(16))
    _refused_everywhere(path, "int64 has requires_grad")


def test_a_neg_flag_on_a_real_tensor_loads_as_torch_load_does(tmp_path):
    path = _torch_file(
        tmp_path / "neg.pt",
        _dict_of(w=_tensor(meta=b"}X\x03\x00\x00\x00neg\x88s")),
        {"0": struct.pack("<2f", 1, 2)},
    )
    want = torch.load(path, weights_only=True)["w"]
    got = tensorfile.load(path)["w"]
    assert got.is_neg() and want.is_neg()
    assert torch.equal(got.resolve_neg(), want.resolve_neg())


def test_a_storage_saved_on_mps_loads_where_map_location_says(tmp_path):
    path = _torch_file(
        tmp_path / "mps.pt", _dict_of(w=_tensor(location="mps")), {"0": struct.pack("<2f", 1, 2)}
    )
    want = torch.load(path, weights_only=True, map_location="cpu")["w"]
    for where in ("cpu", {"mps": "cpu"}):
        assert torch.equal(tensorfile.load(path, map_location=where)["w"], want)
    with tensorfile.open(path) as f:
        assert f.keys() == ["w"]
    assert _cli("verify", path).returncode == 0  # the file is sound


def test_a_storage_meant_for_mps_gives_a_clear_error_here(tmp_path):
    path = _torch_file(
        tmp_path / "mps.pt", _dict_of(w=_tensor(location="mps")), {"0": struct.pack("<2f", 1, 2)}
    )
    with pytest.raises(RuntimeError, match=r"mps\.pt.*mps.*map_location"):
        tensorfile.load(path)  # AttributeError from torch internals before


def test_a_5000_digit_int_key_has_a_bounded_key_path(tmp_path):
    path = tmp_path / "bigkey.pt"
    big = 10**4999
    torch.save({big: torch.ones(1), (1, big): torch.zeros(1), "x": torch.arange(2)}, path)
    got = tensorfile.load(path)
    assert list(got) == [big, (1, big), "x"] and torch.equal(got[big], torch.ones(1))
    with tensorfile.open(path) as f:
        assert f.keys() == ["<int of 16607 bits>", "(1, <int of 16607 bits>)", "x"]
        assert torch.equal(f.get("<int of 16607 bits>"), torch.ones(1))
        assert torch.equal(f.get("x"), torch.arange(2))
    assert _cli("verify", path).returncode == 0
    r = _cli("inspect", path)
    assert r.returncode == 0 and "<int of 16607 bits>" in r.stdout


@pytest.mark.parametrize(
    "shape", [[2**64, 0], [2**62, 4, 0], [0, 2**63]], ids=["2^64", "strides-overflow", "2^63"]
)
def test_a_safetensors_shape_past_int64_is_refused(tmp_path, shape):
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    _refused_everywhere(path, "shape")


# --------------------------------------------------------------------------- storage types


def _two_views(first: str, second: str) -> bytes:
    def one(stype, numel):
        return _tensor(stype, numel=numel, size=b"K\x02\x85")

    sizes = {"FloatStorage": 4, "DoubleStorage": 2, "UntypedStorage": 16, "ByteStorage": 16}
    return b"\x80\x02](" + one(first, sizes[first]) + one(second, sizes[second]) + b"e."


@pytest.mark.parametrize(
    "first, second",
    [
        ("FloatStorage", "DoubleStorage"),
        ("DoubleStorage", "FloatStorage"),
        ("ByteStorage", "FloatStorage"),
    ],
)
def test_one_storage_under_two_types_loads_as_torch_load_does(tmp_path, first, second):
    # torch.load loads a storage once, typed by its first reference
    path = _torch_file(
        tmp_path / "mixed.pt", _two_views(first, second), {"0": struct.pack("<4f", 1, 2, 3, 4)}
    )
    want = torch.load(path, weights_only=True)
    got = tensorfile.load(path)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with tensorfile.open(path) as f:
        assert f.get("1").dtype == want[1].dtype


# --------------------------------------------------------------------------- JSON


def test_json_depth_is_measured_without_parsing():
    cases = {
        b"{}": 1,
        b'{"a": [1, {"b": []}]}': 4,
        b'["[[[[", "\\"[[[", "\\\\", [[]]]': 3,
        b'"[[[["': 0,
        b"[" * 10**6: 10**6,
    }
    for raw, depth in cases.items():
        assert _safejson.max_depth_of(raw) == depth, raw[:40]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text('[]{}"\\a'), kids),
        max_leaves=30,
    ),
    st.sampled_from([1, 2, 3, 7, 1 << 22]),
)
def test_json_depth_agrees_with_the_parsed_value(value, chunk):
    def depth(v):
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    raw = json.dumps(value).encode()
    old = _safejson._CHUNK
    _safejson._CHUNK = chunk  # strings and escapes that straddle chunk boundaries
    try:
        assert _safejson.max_depth_of(raw) == depth(value)
    finally:
        _safejson._CHUNK = old


def test_deep_json_is_refused_whatever_the_recursion_limit(tmp_path):
    path = tmp_path / "deep.safetensors"
    header = b'{"a":' + b"[" * 10**6 + b"]" * 10**6 + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    r = _in_child(
        f"""
        sys.setrecursionlimit(10**7)
        try:
            tensorfile.load({str(path)!r})
        except FormatError as e:
            print("FormatError", e)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]  # -11 (SIGSEGV) before
    assert "FormatError" in r.stdout and "deep.safetensors" in r.stdout
    assert "nested more than" in r.stdout
    with pytest.raises(FormatError, match=r"x\.json: JSON nested more than 5 deep"):
        _safejson.loads(b"[[[[[[]]]]]]", name="x.json", max_depth=5)
    assert _safejson.loads(b"[[[[[]]]]]", name="x.json", max_depth=5) == [[[[[]]]]]
    with pytest.raises(FormatError, match=r"x\.json: not valid UTF-8 JSON"):
        _safejson.loads(b"[\xff]", name="x.json", max_depth=5)


# --------------------------------------------------------------------------- the unpickler


_ALLOWED = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(min_size=1, max_size=8)  # b"" is bytes(), a global torch.load refuses too
    | st.complex_numbers(allow_nan=False),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.tuples(kids, kids)
        | st.dictionaries(st.integers() | st.text(max_size=4) | st.tuples(st.integers()), kids)
        | st.builds(collections.OrderedDict, st.dictionaries(st.text(max_size=4), kids))
        | st.sets(st.integers() | st.text(max_size=4), max_size=4)
        | st.builds(bytearray, st.binary(max_size=8))
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ALLOWED, st.integers(min_value=0, max_value=5))
def test_the_unpickler_reads_what_pickle_writes(value, protocol):
    """Our opcode loop against the C unpickler, on every protocol's encoding of plain
    values and the containers torch.load(weights_only=True) allows."""
    data = pickle.dumps([value, value], protocol=protocol)  # the second is a memo GET
    got, _, _ = torchzip.unpickle(data, torch, set(), "x")
    want = pickle.loads(data)
    assert got == want and repr(got) == repr(want)
    assert got[0] is got[1] or not isinstance(value, (list, dict, set, bytearray))


def test_the_unpickler_reads_torch_save_of_every_container(tmp_path):
    t = torch.arange(4.0)
    obj = {
        "t": t,
        "views": [t[1:], t.view(2, 2).t()],
        "p": torch.nn.Parameter(torch.ones(2)),
        "od": collections.OrderedDict(a=1),
        "c": collections.Counter("aab"),
        "s": {1, 2},
        "b": bytearray(b"xy"),
        "z": 1 + 2j,
        "size": torch.Size([2, 3]),
        "dev": torch.device("cpu"),
        "dtype": torch.bfloat16,
        (1, "k"): None,
    }
    for protocol in (2, 4, 5):
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_protocol=protocol)
        path = tmp_path / f"p{protocol}.pt"
        path.write_bytes(buf.getvalue())
        # torch's weights-only unpickler reads protocol 2 only (FRAME is beyond it); the
        # file is our own, so plain pickle rules may read the others
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            want = torch.load(path, weights_only=protocol == 2)
        got = tensorfile.load(path)
        assert list(got) == list(want)
        for k in want:
            if isinstance(want[k], torch.Tensor):
                assert torch.equal(got[k], want[k]) and type(got[k]) is type(want[k])
            elif k == "views":
                assert all(torch.equal(a, b) for a, b in zip(got[k], want[k]))
            else:
                assert got[k] == want[k] and type(got[k]) is type(want[k]), k


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\x80\x02N", "not a valid torch.save pickle"),  # no STOP
        (b"\x80\x02X\xff\xff\x00\x00ab.", "truncated"),
        (b"\x80\x04\x95\xff\xff\xff\x00\x00\x00\x00\x00N.", "truncated"),  # FRAME too long
        (b"\x80\x02h\x05.", "not a valid torch.save pickle"),  # memo GET of nothing
        (b"\x80\x02]K\x01K\x02s.", "SETITEM needs a dict"),
        (b"\x80\x02}K\x01a.", "APPEND needs a list"),
        (b"\x80\x02\x82\x01.", "extension registry"),
        (b"\x80\x05\x97.", "out-of-band"),
        (b"\x80\x02K\x01)R.", "it calls a int"),
        (b"\x80\x02ccollections\nOrderedDict\n)\x81}S'a'\nK\x01sb.", None),
        (b"\x80\x02]}b.", "sets the state of a list"),
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.", "not a class it may build"),
        (b"\x80\x06N.", "protocol 6"),
        (b"\x80\x02\xff.", "unknown pickle opcode 0xff"),
    ],
)
def test_malformed_pickles_are_format_errors(tmp_path, body, match):
    path = _torch_file(tmp_path / "m.pt", body)
    if match is None:  # NEWOBJ of an OrderedDict and a BUILD of its attributes: fine
        got = tensorfile.load(path)
        assert type(got) is collections.OrderedDict and got.a == 1
        return
    with pytest.raises(FormatError, match=match) as e:
        tensorfile.load(path)
    assert "m.pt" in str(e.value)


def test_every_byte_of_the_zip_directory_is_checked(tmp_path):
    """Each byte of the central directory and the local headers, changed: the file
    loads as before or raises FormatError naming it (the checks run on all entries at
    once, and the entry-by-entry reader words the first problem)."""
    path = tmp_path / "z.pt"
    torch.save({"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)}, path)
    good = path.read_bytes()
    want = tensorfile.load(path)
    with zipfile.ZipFile(path) as z:
        heads = [i.header_offset for i in z.infolist()]
        cd = z.start_dir
    places = [*range(cd, len(good))] + [h + k for h in heads for k in range(30)]
    outcomes = collections.Counter()
    for at in places:
        bad = bytearray(good)
        bad[at] ^= 0x41
        path.write_bytes(bytes(bad))
        try:
            got = tensorfile.load(path)
        except FormatError as e:
            assert "z.pt" in str(e)
            outcomes["refused"] += 1
            continue
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        outcomes["same"] += 1
    assert outcomes["refused"] > len(places) // 2
