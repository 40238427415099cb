"""The format's validation rules, one crafted file per rule, and golden bytes.

Each crafted file starts as a valid file written by tensorfile.save; a helper edits one
thing in its header (or bytes) and re-encodes the header, recomputing the layout, the
preamble and the header checksum, so that the edit is the only thing wrong with it.
Every refusal must be a FormatError (ChecksumError for damaged bytes) naming the file.
"""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile

import numpy as np
import pytest
import tensorfile
import torch
from _util import assert_same, crc32c_py
from tensorfile import ChecksumError, FormatError
from tensorfile.formats.native import (
    PREAMBLE,
    data_start,
    file_nbytes,
    header_crc,
    make_preamble,
)


def encode(header: dict) -> bytes:
    """The header as the writer emits it: compact, ASCII JSON."""
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class Crafted:
    """A valid file taken apart: its header (a dict) and its storages' bytes."""

    def __init__(self, path, obj):
        self.path = path
        tensorfile.save(obj, path)
        self.original = path.read_bytes()
        self.header, self.datas = self.parse(self.original)

    @staticmethod
    def parse(raw: bytes):
        _, _, _, _, hlen, _ = PREAMBLE.unpack_from(raw)
        header = json.loads(raw[32 : 32 + hlen])
        start = data_start(hlen)
        datas = [bytearray(raw[start + o : start + o + n]) for o, n, _ in header["storages"]]
        return header, datas

    def edited(self):
        """A deep copy of the header to edit."""
        return copy.deepcopy(self.header)

    def assemble(self, header=None, datas=None, *, raw_header=None, fix_crcs=False) -> bytes:
        header = self.edited() if header is None else header
        datas = self.datas if datas is None else datas
        if fix_crcs:
            header["crc32c"] = "".join(f"{crc32c_py(bytes(d)):08x}" for d in datas)
        hb = encode(header) if raw_header is None else raw_header
        offsets, sizes = self._layout(header["storages"])
        total = file_nbytes(len(hb), offsets, sizes)
        buf = bytearray(total)
        buf[:32] = make_preamble(hb, total)
        buf[32 : 32 + len(hb)] = hb
        start = data_start(len(hb))
        for off, data in zip(offsets, datas):
            end = min(start + off + len(data), total)
            if end > start + off:
                buf[start + off : end] = data[: end - start - off]
        return bytes(buf)

    def _layout(self, rows):
        """Where the storages go: as the (edited) table says, except where an edit made
        an entry unusable as a size (not an int, or absurdly large); there the original
        value stands, so the file is still the edited header plus sensible bytes."""
        offsets, sizes = [], []
        for i, row in enumerate(rows):
            orig = self.header["storages"][i] if i < len(self.header["storages"]) else [0, 0]
            pair = []
            for j in (0, 1):
                v = row[j] if type(row) is list and len(row) > j else None
                ok = type(v) is int and 0 <= v < (1 << 24)
                pair.append(v if ok else orig[j])
            offsets.append(pair[0])
            sizes.append(pair[1])
        return offsets, sizes

    def write(self, header=None, datas=None, **kw):
        self.path.write_bytes(self.assemble(header, datas, **kw))
        return self.path


def expect(path, exc=FormatError, match=None, *, lazy=True, **load_kw):
    """load(path) raises exactly `exc`, naming the file; with lazy, so does open(path)."""
    with pytest.raises(FormatError) as e:
        tensorfile.load(path, **load_kw)
    assert type(e.value) is exc, f"{type(e.value).__name__}: {e.value}"
    assert isinstance(e.value, ValueError)
    assert str(path) in str(e.value), str(e.value)
    if match is not None:
        assert re.search(match, str(e.value)), str(e.value)
    if lazy:
        with pytest.raises(exc) as e2:
            tensorfile.open(path, verify=load_kw.get("verify", True))
        assert type(e2.value) is exc and str(path) in str(e2.value)
    return e.value


def set_preamble(path, recrc=True, **fields):
    """Rewrites preamble fields (major, minor, hcrc, hlen, flen); recomputes the header
    checksum over the header bytes unless recrc is False or hcrc is given."""
    raw = bytearray(path.read_bytes())
    magic, major, minor, hcrc, hlen, flen = PREAMBLE.unpack_from(raw)
    old_hlen = hlen
    vals = {
        "magic": magic,
        "major": major,
        "minor": minor,
        "hcrc": hcrc,
        "hlen": hlen,
        "flen": flen,
    }
    vals.update(fields)
    if recrc and "hcrc" not in fields:
        draft = PREAMBLE.pack(
            vals["magic"], vals["major"], vals["minor"], 0, vals["hlen"], vals["flen"]
        )
        vals["hcrc"] = header_crc(draft, bytes(raw[32 : 32 + old_hlen]))
    raw[:32] = PREAMBLE.pack(*vals.values())
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture
def two(tmp_path):
    """A file with two small torch storages and one numpy storage."""
    return Crafted(
        tmp_path / "two.tf",
        {
            "a": torch.arange(3, dtype=torch.int32),
            "b": torch.arange(5, dtype=torch.int32),
            "c": np.arange(4, dtype=np.int16),
            "v": 0.123456,
        },
    )


def test_crafted_baseline_is_valid(two):
    # The helper alone changes nothing: it reproduces the writer's bytes exactly.
    assert two.assemble() == two.original
    path = two.write()
    out = tensorfile.load(path)
    assert torch.equal(out["b"], torch.arange(5, dtype=torch.int32))


# --------------------------------------------------------------------------- preamble


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tf"
    path.write_bytes(b"")
    expect(path, match="empty")


@pytest.mark.parametrize("n", [1, 8, 31])
def test_short_preamble(two, n):
    two.path.write_bytes(two.original[:n])
    expect(two.path, match="preamble")


def test_wrong_magic(two):
    two.path.write_bytes(b"TNSRFILX" + two.original[8:])
    expect(two.path, match="magic")


def test_format_comes_from_the_bytes_not_the_name(tmp_path):
    # a torch.save file named like a safetensors file and the reverse both load by content
    pt = tmp_path / "really_torch.safetensors"
    torch.save({"x": torch.ones(2)}, pt)
    assert zipfile.is_zipfile(pt)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    st = tmp_path / "really_safetensors.pt"
    safetensors_torch.save_file({"y": torch.zeros(3)}, str(st))
    with tensorfile.open(pt) as a, tensorfile.open(st) as b:
        assert (a.format, b.format) == ("torch.save", "safetensors")
    assert torch.equal(tensorfile.load(pt)["x"], torch.ones(2))
    assert torch.equal(tensorfile.load(st)["y"], torch.zeros(3))


def test_unknown_bytes_name_the_formats_read(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"GIF89a" + bytes(100))
    expect(path, match="torch.save zip and safetensors")


def test_plain_pickle_is_refused_by_name(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    expect(path, match="legacy")


@pytest.mark.parametrize("major", [0, 2, 65535])
def test_unknown_major_version(two, major):
    set_preamble(two.path, major=major)
    expect(two.path, match=rf"version {major}\.0 is not supported")


@pytest.mark.parametrize("minor", [1, 7, 65535])
def test_any_minor_version_is_read(two, minor):
    set_preamble(two.path, minor=minor)
    out = tensorfile.load(two.path)
    assert torch.equal(out["a"], torch.arange(3, dtype=torch.int32))


def test_header_length_beyond_the_file(two):
    set_preamble(two.path, hlen=len(two.original))
    expect(two.path)


@pytest.mark.parametrize("hlen", [2**63, 2**64 - 1, (64 << 20) + 1])
def test_header_length_over_the_limit(two, hlen):
    set_preamble(two.path, hlen=hlen)
    expect(two.path, match="header")


@pytest.mark.parametrize("cut", [1, 5, 4096, "mid-header", "header-end"])
def test_truncated(two, cut):
    _, _, _, _, hlen, _ = PREAMBLE.unpack_from(two.original)
    n = {"mid-header": 32 + hlen // 2, "header-end": 32 + hlen}.get(cut, None)
    n = len(two.original) - cut if n is None else n
    two.path.write_bytes(two.original[:n])
    expect(two.path, match="truncated")


@pytest.mark.parametrize("tail", [b"\x00", b"junk", bytes(4096)])
def test_trailing_bytes(two, tail):
    two.path.write_bytes(two.original + tail)
    expect(two.path, match="trailing")


@pytest.mark.parametrize("delta", [-1, 1, 4096])
def test_recorded_file_size_differs_from_real_size(two, delta):
    set_preamble(two.path, flen=len(two.original) + delta)
    expect(two.path)


def test_recorded_file_size_differs_from_layout(two):
    # The preamble and the real size agree, but the storage table ends elsewhere.
    raw = two.original + bytes(4096)
    two.path.write_bytes(raw)
    set_preamble(two.path, flen=len(raw))
    expect(two.path, match="storages end")


def test_truncated_stream(two):
    for n in (20, 100, len(two.original) - 1):
        with pytest.raises(FormatError):
            tensorfile.load(io.BytesIO(two.original[:n]))


def test_stream_with_trailing_bytes(two):
    with pytest.raises(FormatError, match="trailing"):
        tensorfile.load(io.BytesIO(two.original + b"\x00"))


# --------------------------------------------------------------------------- header text


def test_non_utf8_header(tmp_path):
    c = Crafted(tmp_path / "u.tf", {"x": torch.ones(2), "s": "XY"})
    hb = encode(c.edited()).replace(b'"XY"', b'"\xff\xfe"')
    c.write(raw_header=hb)
    expect(c.path, match="UTF-8")


@pytest.mark.parametrize(
    "edit",
    [
        lambda hb: hb[:-1],
        lambda hb: hb + b"x",
        lambda hb: hb[:-1] + b"]",
        lambda hb: hb.replace(b'"tree":', b'"tree"'),
        lambda hb: b"[" + hb + b"]",
        lambda hb: b"",
        lambda hb: b'"just a string"',
    ],
    ids=["cut", "junk", "bracket", "colon", "array", "empty", "string"],
)
def test_invalid_json(two, edit):
    two.write(raw_header=edit(encode(two.edited())))
    expect(two.path)


@pytest.mark.parametrize("where", ["top", "metadata"])
def test_duplicate_json_keys(two, where):
    hb = encode(two.edited())
    if where == "top":
        hb = hb[:-1] + b',"crc32c":' + json.dumps(two.header["crc32c"]).encode() + b"}"
    else:
        hb = hb.replace(b'"metadata":{}', b'"metadata":{"k":"1","k":"2"}')
    two.write(raw_header=hb)
    expect(two.path, match="duplicate")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_constants(two, constant):
    hb = encode(two.edited()).replace(b"0.123456", constant)
    two.write(raw_header=hb)
    expect(two.path)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1E999"])
def test_plain_float_not_finite(two, number):
    hb = encode(two.edited()).replace(b"0.123456", number)
    two.write(raw_header=hb)
    expect(two.path, match="finite")


@pytest.mark.parametrize("node", [b'["complex",1e400,0.0]', b'["complex",0.0,-1e400]'])
def test_complex_part_not_finite(two, node):
    # A complex part is a finite float or a ["float", s] node (format.md 7.2).
    hb = encode(two.edited()).replace(b"0.123456", node)
    two.write(raw_header=hb)
    expect(two.path)


def test_unknown_header_key(two):
    h = two.edited()
    h["extra"] = 1
    two.write(h)
    expect(two.path, match="keys")


def test_missing_header_key(two):
    h = two.edited()
    del h["metadata"]
    two.write(h)
    expect(two.path, match="keys")


def test_header_keys_out_of_order(two):
    h = two.edited()
    h = {k: h[k] for k in ("tensors", "tree", "storages", "metadata", "crc32c")}
    two.write(h)
    expect(two.path, match="keys")


@pytest.mark.parametrize("meta", [[], {"k": 1}, {"k": None}, "x"])
def test_metadata_must_map_str_to_str(two, meta):
    h = two.edited()
    h["metadata"] = meta
    two.write(h)
    expect(two.path, match="metadata")


@pytest.mark.parametrize(
    "crc",
    [
        lambda c: c[:-1],
        lambda c: c + "0",
        lambda c: c[:-8],
        lambda c: "g" + c[1:],
        lambda c: c[:8] + " " * 8 + c[16:],
        lambda c: c.upper(),
        lambda c: int(c[:8], 16),
    ],
    ids=["short", "long", "one-group-less", "non-hex", "spaces", "upper", "number"],
)
def test_crc32c_field(two, crc):
    h = two.edited()
    h["crc32c"] = crc(h["crc32c"])
    two.write(h)
    expect(two.path, match="crc32c")


# --------------------------------------------------------------------------- tensor table


@pytest.mark.parametrize(
    "row, value",
    [
        (0, "float128"),
        (0, "quint8"),
        (0, "Float32"),
        (0, "torch.float32"),
        (0, 7),
        (0, ["int32"]),
        (2, "float128"),
        (2, "object"),
        (2, ">i2"),
    ],
)
def test_unknown_dtype(two, row, value):
    h = two.edited()
    h["tensors"][row][2] = value
    two.write(h)
    expect(two.path, match="dtype")


@pytest.mark.parametrize("kind", ["jax", "", None, ["torch"]])
def test_unknown_kind(two, kind):
    h = two.edited()
    h["tensors"][0][0] = kind
    two.write(h)
    expect(two.path, match="kind")


@pytest.mark.parametrize("shape", [[-3], [3.0], ["3"], [True], [None], 3, [[3]]])
def test_bad_shape(two, shape):
    h = two.edited()
    h["tensors"][0][3] = shape
    two.write(h)
    expect(two.path)


def test_shape_and_strides_lengths_differ(two):
    h = two.edited()
    h["tensors"][0][4] = [1, 1]
    two.write(h)
    expect(two.path, match="equal length")


def test_too_many_dimensions(two):
    h = two.edited()
    h["tensors"][0][3] = [1] * 65
    h["tensors"][0][4] = [1] * 65
    two.write(h)
    expect(two.path, match="64")


@pytest.mark.parametrize(
    "shape, strides",
    [([2**40, 2**40], [0, 0]), ([3, 2**62], [1, 0]), ([2**63 - 1, 2], [0, 0])],
)
def test_shape_product_overflow(two, shape, strides):
    h = two.edited()
    h["tensors"][0][3] = shape
    h["tensors"][0][4] = strides
    two.write(h)
    expect(two.path, match="2\\^63")


@pytest.mark.parametrize("strides", [[-1], [1.0], [2**63], [None]])
def test_bad_torch_stride(two, strides):
    h = two.edited()
    h["tensors"][0][4] = strides
    two.write(h)
    expect(two.path, match="stride")


@pytest.mark.parametrize(
    "row, field, value",
    [
        (0, 3, [4]),  # one element too many
        (0, 4, [2]),  # strides reach past the end
        (0, 5, 4),  # offset pushes the last element out
        (1, 3, [5, 2]),  # 2-d: needs 40 bytes of 20
        (2, 3, [5]),  # numpy
        (2, 4, [3]),  # numpy, odd byte stride past the end
        (2, 5, 2),  # numpy offset
        (2, 4, [-2]),  # numpy negative stride before the start
    ],
)
def test_tensor_needs_more_than_its_storage(two, row, field, value):
    h = two.edited()
    if row == 1 and field == 3:
        h["tensors"][1][4] = [2, 1]
    h["tensors"][row][field] = value
    two.write(h)
    expect(two.path)


def test_torch_offset_not_a_multiple_of_the_element_size(tmp_path):
    c = Crafted(tmp_path / "o.tf", {"x": torch.arange(8, dtype=torch.int32)[1:3]})
    h = c.edited()
    assert h["tensors"][0][5] == 4
    h["tensors"][0][5] = 6
    c.write(h)
    expect(c.path, match="multiple")


@pytest.mark.parametrize("flags", [4, -1, 1.0, True, None])
def test_bad_flags(two, flags):
    h = two.edited()
    h["tensors"][0][6] = flags
    two.write(h)
    expect(two.path, match="flags")


def test_numpy_flags_must_be_zero(two):
    h = two.edited()
    h["tensors"][2][6] = 1
    two.write(h)
    expect(two.path, match="flags")


@pytest.mark.parametrize("index", [3, -1, True, 1.0, "0"])
def test_storage_index_out_of_range(two, index):
    h = two.edited()
    h["tensors"][0][1] = index
    two.write(h)
    expect(two.path, match="storage index")


@pytest.mark.parametrize("row", [["torch", 0, "int32", [3], [1], 0], "row", None])
def test_malformed_tensor_row(two, row):
    h = two.edited()
    h["tensors"][0] = row
    two.write(h)
    expect(two.path)


def test_storage_shared_by_torch_and_numpy(two):
    h = two.edited()
    h["tensors"].append(["numpy", 0, "int16", [6], [2], 0, 0])
    h["tree"] += ["d", ["ndarray", 3]]
    two.write(h)
    expect(two.path, match="torch and numpy")


def test_tensor_row_not_referenced(two):
    h = two.edited()
    h["tensors"].append(["torch", 0, "int32", [3], [1], 0, 0])
    two.write(h)
    expect(two.path, match="referenced")


@pytest.mark.parametrize(
    "ref",
    [["tensor", 3], ["tensor", -1], ["tensor", True], ["tensor", 2], ["ndarray", 0], ["tensor"]],
)
def test_bad_tree_reference(two, ref):
    h = two.edited()
    h["tree"][-1] = ref  # the value of "v"
    two.write(h)
    expect(two.path)


# --------------------------------------------------------------------------- storage table


def test_storage_offset_unaligned(two):
    h = two.edited()
    h["storages"][1][0] = 4100
    two.write(h)
    expect(two.path, match="storage 1")


def test_storage_offset_overlapping(two):
    h = two.edited()
    h["storages"][1][0] = 0
    two.write(h)
    expect(two.path, match="overlaps")


def test_storage_offset_with_a_gap(two):
    h = two.edited()
    h["storages"][1][0] = 8192
    two.write(h)
    expect(two.path, match="storage 1")


def test_storage_offsets_out_of_order(two):
    h = two.edited()
    assert [r[0] for r in h["storages"]] == [0, 4096, 8192]
    h["storages"][0][0], h["storages"][1][0] = 4096, 0
    two.write(h)
    expect(two.path, match="storage 0")


def test_first_storage_not_at_zero(two):
    h = two.edited()
    for row in h["storages"]:
        row[0] += 4096
    two.write(h)
    expect(two.path, match="storage 0")


@pytest.mark.parametrize("nbytes", [-12, 12.0, "12", 2**63])
def test_bad_storage_nbytes(two, nbytes):
    h = two.edited()
    h["storages"][0][1] = nbytes
    two.write(h)
    expect(two.path)


@pytest.mark.parametrize(
    "device", ["gpu", "cuda:x", "CPU", "", 0, None, "cpu ", "cuda:", "cuda:123456", "meta", "mps"]
)
def test_bad_storage_device(two, device):
    # format.md rule 14: a storage's device is cpu, cuda or cuda:N (N: 1-5 ASCII digits).
    h = two.edited()
    h["storages"][0][2] = device
    two.write(h)
    expect(two.path, match="device")


@pytest.mark.parametrize("row", [[0, 12], [0, 12, "cpu", 0], "x"])
def test_malformed_storage_row(two, row):
    h = two.edited()
    h["storages"][0] = row
    two.write(h)
    expect(two.path)


def test_storage_not_referenced(two):
    h = two.edited()
    h["storages"].append([12288, 16, "cpu"])
    two.write(h, [*two.datas, bytearray(range(16))], fix_crcs=True)
    expect(two.path, match="storage 3 is not used")


def test_storage_larger_than_its_tensors_use(two):
    h = two.edited()
    h["storages"][0][1] = 16
    datas = [bytearray(two.datas[0] + b"\x00" * 4), *two.datas[1:]]
    two.write(h, datas, fix_crcs=True)
    expect(two.path, match="storage 0 holds 16 bytes")


def test_storage_smaller_than_its_tensors_use(two):
    h = two.edited()
    h["storages"][0][1] = 8
    two.write(h, [two.datas[0][:8], *two.datas[1:]], fix_crcs=True)
    expect(two.path, match="needs 12 bytes")


# --------------------------------------------------------------------------- padding


def test_nonzero_padding_after_the_header(two):
    _, _, _, _, hlen, _ = PREAMBLE.unpack_from(two.original)
    for at in (32 + hlen, data_start(hlen) - 1):
        raw = bytearray(two.original)
        raw[at] = 1
        two.path.write_bytes(bytes(raw))
        expect(two.path, match="padding")
        # also when only one tensor is read lazily (format.md rule 33)
        with pytest.raises(FormatError, match="padding"):
            with tensorfile.open(two.path) as f:
                f.get("a")
        with pytest.raises(FormatError, match="padding"):
            tensorfile.load(io.BytesIO(bytes(raw)))


@pytest.fixture
def big(tmp_path):
    """Storages of several sizes, including ones above the engine's gathering limit."""
    return Crafted(
        tmp_path / "big.tf",
        {
            "small": torch.arange(3, dtype=torch.int32),
            "large": torch.arange(100_000, dtype=torch.float32),  # 400 KB, chunked
            "odd": torch.arange(70_001, dtype=torch.int32),  # 280 KB, unaligned end
            "tail": torch.arange(5, dtype=torch.int16),
            "np": np.arange(9, dtype=np.float64),
        },
    )


def _storage_span(c, s):
    _, _, _, _, hlen, _ = PREAMBLE.unpack_from(c.original)
    off, nb, _ = c.header["storages"][s]
    return data_start(hlen) + off, nb


@pytest.mark.parametrize("s", [0, 1, 2, 3])
@pytest.mark.parametrize("how", ["pread", "mmap", "stream"])
def test_nonzero_padding_between_storages(big, s, how):
    start, nb = _storage_span(big, s)
    raw = bytearray(big.original)
    raw[start + nb] = 0x80  # the first padding byte after storage s
    big.path.write_bytes(bytes(raw))
    if how == "pread":
        expect(big.path, match="padding", lazy=False)
        expect(big.path, match="padding", lazy=False, verify=False)
    elif how == "mmap":
        expect(big.path, match="padding", lazy=False, mmap=True)
    else:
        with pytest.raises(FormatError, match="padding"):
            tensorfile.load(io.BytesIO(bytes(raw)))


# --------------------------------------------------------------------------- checksums


def test_flipped_bit_in_the_header(two):
    _, _, _, _, hlen, _ = PREAMBLE.unpack_from(two.original)
    for at in (32, 32 + hlen // 2, 32 + hlen - 1):
        raw = bytearray(two.original)
        raw[at] ^= 0x04
        two.path.write_bytes(bytes(raw))
        expect(two.path, ChecksumError, match="header checksum")


@pytest.mark.parametrize(
    "at, exc",
    [
        (10, ChecksumError),
        (11, ChecksumError),
        (12, ChecksumError),
        (15, ChecksumError),
        (16, FormatError),
        (24, FormatError),
    ],
    ids=["minor-lo", "minor-hi", "crc-lo", "crc-hi", "hlen", "flen"],
)
def test_header_checksum_covers_the_preamble(two, at, exc):
    # A flipped bit in the minor version or the checksum itself is caught by the header
    # checksum; one in a length may break a structural rule first.
    raw = bytearray(two.original)
    raw[at] ^= 0x01
    two.path.write_bytes(bytes(raw))
    if exc is ChecksumError:
        expect(two.path, exc)
    else:  # either rule may fire first
        with pytest.raises(FormatError, match=re.escape(str(two.path))):
            tensorfile.load(two.path)


def test_minor_version_bit_flip_reads_without_verify(two):
    raw = bytearray(two.original)
    raw[10] ^= 0x02
    two.path.write_bytes(bytes(raw))
    expect(two.path, ChecksumError)
    out = tensorfile.load(two.path, verify=False)  # any minor is read
    assert torch.equal(out["a"], torch.arange(3, dtype=torch.int32))


_BIG_KEYS = ["small", "large", "odd", "tail", "np"]


@pytest.mark.parametrize("s", range(5))
def test_flipped_bit_in_each_storage(big, s):
    start, nb = _storage_span(big, s)
    raw = bytearray(big.original)
    raw[start + nb // 2] ^= 0x10
    big.path.write_bytes(bytes(raw))
    err = expect(big.path, ChecksumError, match=f"storage {s}", lazy=False)
    assert _BIG_KEYS[s] in str(err)
    expect(big.path, ChecksumError, lazy=False, mmap=True)
    with pytest.raises(ChecksumError):
        tensorfile.load(io.BytesIO(bytes(raw)))
    with tensorfile.open(big.path) as f:
        with pytest.raises(ChecksumError):
            f.get(_BIG_KEYS[s])
        others = [k for k in _BIG_KEYS if k != _BIG_KEYS[s]]
        for k in others:  # undamaged storages still read
            f.get(k)
    # verify=False reads the damaged bytes as they are
    for kw in ({}, {"mmap": True}):
        out = tensorfile.load(big.path, verify=False, **kw)
        good = tensorfile.load(io.BytesIO(big.original))
        for k in _BIG_KEYS:
            same = np.array_equal(np.asarray(out[k]), np.asarray(good[k]))
            assert same == (k != _BIG_KEYS[s]), k
    with tensorfile.open(big.path, verify=False) as f:
        f.get(_BIG_KEYS[s])


def test_storage_checksum_field_wrong(two):
    h = two.edited()
    h["crc32c"] = "0" * 8 + h["crc32c"][8:]
    two.write(h)
    expect(two.path, ChecksumError, match="storage 0", lazy=False)
    assert tensorfile.load(two.path, verify=False)["a"].tolist() == [0, 1, 2]


def test_verify_false_still_applies_structural_rules(two):
    h = two.edited()
    h["tensors"][0][2] = "float128"
    raw = bytearray(two.assemble(h))
    raw[12] ^= 0xFF  # and a wrong header checksum, which verify=False ignores
    two.path.write_bytes(bytes(raw))
    expect(two.path, verify=False, match="dtype")
    expect(two.path, ChecksumError)


# --------------------------------------------------------------------------- the object tree


def _raw_tree_file(c: Crafted, tree_json: bytes) -> bytes:
    """A file with no tensors whose tree is the given JSON text."""
    hb = b'{"tree":' + tree_json + b',"tensors":[],"storages":[],"metadata":{},"crc32c":""}'
    return c.assemble({"storages": []}, [], raw_header=hb)


@pytest.mark.parametrize("tag", ["list", "tuple"])
def test_hostile_nesting_depth(two, tag):
    n = 100_000
    tree = (f'["{tag}",' * n).encode() + b"1" + b"]" * n
    two.path.write_bytes(_raw_tree_file(two, tree))
    err = expect(two.path)
    assert not isinstance(err.__cause__, RecursionError)


def test_hostile_nesting_of_dicts(two):
    n = 100_000
    tree = b'["dict","k",' * n + b"1" + b"]" * n
    two.path.write_bytes(_raw_tree_file(two, tree))
    expect(two.path)


def test_nesting_limit(two):
    ok = b'["list",' * 201 + b"1" + b"]" * 201  # tagged nodes at depths 0..200
    two.path.write_bytes(_raw_tree_file(two, ok))
    out = tensorfile.load(two.path)
    for _ in range(200):
        out = out[0]
    assert out == [1]
    deep = b'["list",' * 202 + b"1" + b"]" * 202
    two.path.write_bytes(_raw_tree_file(two, deep))
    expect(two.path, match="200")


@pytest.mark.parametrize(
    "node",
    [
        ["set", 1, 2],
        [],
        [1, 2],
        {"a": 1},
        ["int", "12"],  # small ints must be plain
        ["int", "--5"],
        ["int", "5-"],
        ["int", "+99999999999999999999"],
        ["int", " 99999999999999999999"],
        ["int", "1" * 4001],
        ["int", 10**20],
        ["float", "NaN"],
        ["float", 1.0],
        ["complex", 1.0],
        ["complex", "1", 0.0],
        ["bytes", "!!"],
        ["bytes", "YQ"],  # missing padding
        ["bytes", "YR=="],  # non-canonical trailing bits
        ["bytes", 5],
        ["bytearray"],
        ["npscalar", "float32", "0000"],
        ["npscalar", "float128", "00" * 16],
        ["npscalar", "int8", "zz"],
        ["npscalar", "int8", "FF"],
        ["npscalar", ["int8"], "00"],
        ["npscalar", "bool", "02"],
        ["dtype", "float128"],
        ["dtype", []],
        ["dtype", 5],
        ["size", -1],
        ["size", 1.0],
        ["size", 2**63],
        ["device", "gpu"],
        ["device", 0],
        ["dict", "a"],
        ["dict", "a", 1, "a", 2],
        ["dict", 1, "x", 1.0, "y"],
        ["dict", ["list"], 1],
        ["dict", ["tensor", 0], 1],
        ["dict", ["bytearray", "YQ=="], 1],
        ["odict"],
        ["odict", ["list"], "a", 1],
        ["odict", ["dict", "__class__", 1], "a", 1],
        ["odict", ["dict", 5, 1], "a", 1],
    ],
    ids=lambda node: json.dumps(node)[:40],
)
def test_bad_tree_node(two, node):
    h = two.edited()
    h["tree"][-1] = node
    two.write(h)
    expect(two.path)


@pytest.mark.parametrize(
    "node, value",
    [
        (["int", "9007199254740993"], 2**53 + 1),
        (["int", "-9007199254740993"], -(2**53) - 1),
        (["complex", 1.5, ["float", "-inf"]], complex(1.5, float("-inf"))),
        (["bytes", "YQ=="], b"a"),
        (["npscalar", "bool", "01"], np.bool_(True)),
        (["size", 2, 0], torch.Size([2, 0])),
        (["dict", ["float", "nan"], 1, ["float", "nan"], 2], None),
    ],
)
def test_good_tree_node(two, node, value):
    h = two.edited()
    h["tree"][-1] = node
    two.write(h)
    out = tensorfile.load(two.path)["v"]
    if value is not None:
        assert_same(value, out)
    else:
        assert len(out) == 2


# --------------------------------------------------------------------------- bool policy


@pytest.fixture
def bools(tmp_path):
    return Crafted(
        tmp_path / "b.tf",
        {"t": torch.tensor([True, False, True]), "n": np.array([[True], [False]])},
    )


@pytest.mark.parametrize("s, key", [(0, "t"), (1, "n")])
@pytest.mark.parametrize("value", [2, 0xFF])
def test_bool_bytes_other_than_0_or_1(bools, s, key, value):
    datas = [bytearray(d) for d in bools.datas]
    datas[s][1] = value
    path = bools.write(datas=datas, fix_crcs=True)
    expect(path, match="bool", lazy=False)
    expect(path, match="bool", lazy=False, verify=False)
    expect(path, match="bool", lazy=False, mmap=True)
    with pytest.raises(FormatError, match="bool"):
        tensorfile.load(io.BytesIO(path.read_bytes()))
    with tensorfile.open(path) as f:
        with pytest.raises(FormatError, match="bool"):
            f.get(key)


# --------------------------------------------------------------------------- golden bytes

# Reviewed against docs/format.md: magic, version 1.0, header CRC32C over bytes 0-11,
# 16-31 and the header, header nbytes, file nbytes; the compact header with its five keys
# in order; zero padding to the 4096-aligned data start; the storage bytes.
GOLDEN_TORCH_HEAD = (
    "544e535246494c4501000000d62282968a000000000000000c10000000000000"
    "7b2274726565223a5b2264696374222c2278222c5b2274656e736f72222c305d5d2c2274656e736f7273"
    "223a5b5b22746f726368222c302c22696e743332222c5b335d2c5b315d2c302c305d5d2c2273746f7261"
    "676573223a5b5b302c31322c22637075225d5d2c226d65746164617461223a7b7d2c2263726333326322"
    "3a226464336265626662227d"
)
GOLDEN_TORCH_DATA = "000000000100000002000000"

GOLDEN_NUMPY_HEAD = (
    "544e535246494c45010000003bb9ef21930000000000000006100000000000007b2274726565223a5b22"
    "64696374222c2261222c5b226e646172726179222c305d2c2273222c312e355d2c2274656e736f727322"
    "3a5b5b226e756d7079222c302c22696e743136222c5b335d2c5b2d325d2c342c305d5d2c2273746f7261"
    "676573223a5b5b302c362c22637075225d5d2c226d65746164617461223a7b7d2c22637263333263223a"
    "226164326165366463227d"
)
GOLDEN_NUMPY_DATA = "000001000200"

GOLDEN_PLAIN = (
    "544e535246494c45010000008f0034e3630000000000000083000000000000007b2274726565223a5b22"
    "64696374222c226e222c5b226c697374222c312c6e756c6c2c225c7530306539225d5d2c2274656e736f"
    "7273223a5b5d2c2273746f7261676573223a5b5d2c226d65746164617461223a7b7d2c22637263333263"
    "223a22227d"
)


def _golden(head_hex: str, data_hex: str) -> bytes:
    head = bytes.fromhex(head_hex)
    if not data_hex:
        return head
    return head + bytes(4096 - len(head)) + bytes.fromhex(data_hex)


@pytest.mark.parametrize(
    "make, head, data",
    [
        (lambda: {"x": torch.arange(3, dtype=torch.int32)}, GOLDEN_TORCH_HEAD, GOLDEN_TORCH_DATA),
        (
            lambda: {"a": np.arange(3, dtype=np.int16)[::-1], "s": 1.5},
            GOLDEN_NUMPY_HEAD,
            GOLDEN_NUMPY_DATA,
        ),
        (lambda: {"n": [1, None, "é"]}, GOLDEN_PLAIN, ""),
    ],
    ids=["torch", "numpy", "no-storages"],
)
def test_golden_bytes(tmp_path, make, head, data):
    expected = _golden(head, data)
    path = tmp_path / "tiny.tf"
    tensorfile.save(make(), path)
    assert path.read_bytes() == expected
    buf = io.BytesIO()
    tensorfile.save(make(), buf)
    assert buf.getvalue() == expected
    # and the golden file loads back to the object
    path.write_bytes(expected)
    assert_same(make(), tensorfile.load(path))


def test_golden_file_matches_the_format_description():
    raw = _golden(GOLDEN_TORCH_HEAD, GOLDEN_TORCH_DATA)
    magic, major, minor, hcrc, hlen, flen = PREAMBLE.unpack(raw[:32])
    assert (magic, major, minor) == (b"TNSRFILE", 1, 0)
    assert flen == len(raw) == 4108 and hlen == 138
    header = raw[32 : 32 + hlen]
    assert hcrc == crc32c_py(raw[:12] + raw[16:32] + header) == 0x968222D6
    doc = json.loads(header)
    assert list(doc) == ["tree", "tensors", "storages", "metadata", "crc32c"]
    assert header == encode(doc)  # compact and ASCII
    start = data_start(hlen)
    assert start == 4096 and not any(raw[32 + hlen : start])
    assert doc["crc32c"] == f"{crc32c_py(raw[start:]):08x}"
    assert np.frombuffer(raw[start:], dtype="<i4").tolist() == [0, 1, 2]
