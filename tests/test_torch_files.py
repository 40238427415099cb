"""Files written by the real torch.save: loaded as torch.load returns them, checked more
strictly, and never executed."""

from __future__ import annotations

import collections
import io
import os
import struct
import subprocess
import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")

import tensorfile  # noqa: E402
from tensorfile import ChecksumError, FormatError  # noqa: E402
from tensorfile._dtypes import TORCH_ITEMSIZE  # noqa: E402


def same(a, b):
    """Deep equality that also compares tensor dtype, shape, strides, offset and class."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert a.storage_offset() == b.storage_offset() and a.requires_grad == b.requires_grad
        assert a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg()
        raw = (
            (lambda t: t.resolve_conj().resolve_neg().reshape(-1).contiguous().view(torch.uint8))
            if a.numel()
            else None
        )
        if raw is not None:
            assert torch.equal(raw(a.detach()), raw(b.detach()))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
        assert getattr(a, "__dict__", {}).keys() == getattr(b, "__dict__", {}).keys()
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


def roundtrip(obj, path):
    torch.save(obj, path)
    want = torch.load(path, weights_only=True)
    got = tensorfile.load(path)
    same(want, got)
    return want, got


def test_model_and_optimizer_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3, "loss": 0.25}
    want, got = roundtrip(ckpt, tmp_path / "ckpt.pt")
    assert got["model"]._metadata == want["model"]._metadata  # OrderedDict attribute survives
    assert set(got["optim"]["state"]) == {0, 1, 2, 3, 4, 5}  # int keys
    model2 = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    model2.load_state_dict(got["model"])


@pytest.mark.slow
def test_more_records_than_a_plain_zip_holds(tmp_path):
    # Over 65,535 records torch.save writes the zip64 end of central directory (and its
    # locator); the record count and directory offset come from there.
    n = 70_000
    path = tmp_path / "many.pt"
    torch.save([torch.full((1,), float(i)) for i in range(n)], path)
    raw = path.read_bytes()
    assert raw.rfind(b"PK\x06\x06") > 0 and raw.rfind(b"PK\x06\x07") > 0
    got = tensorfile.load(path)
    assert len(got) == n
    assert torch.equal(torch.cat(got), torch.arange(n, dtype=torch.float32))
    with tensorfile.open(path) as f:
        assert len(f) == n and f.get("69999").item() == 69999.0


def test_views_strides_and_shared_storages(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    obj = {
        "base": base,
        "t": base.t(),
        "row": base[2],
        "every_other": base[:, ::2],
        "flat_tail": base.view(-1)[5:],
        "expanded": torch.ones(3, 1).expand(3, 4),
        "param": torch.nn.Parameter(torch.randn(3)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "grad": torch.randn(2).requires_grad_(),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(7),
    }
    _, got = roundtrip(obj, tmp_path / "views.pt")
    ptr = got["base"].untyped_storage().data_ptr()
    for k in ("t", "row", "every_other", "flat_tail"):
        assert got[k].untyped_storage().data_ptr() == ptr, k
    got["base"][0, 1] = 100.0  # views still share memory after loading
    assert got["t"][1, 0] == 100.0
    assert type(got["param"]) is torch.nn.Parameter and got["param"].requires_grad
    assert not got["frozen"].requires_grad


def test_nested_containers_and_plain_values(tmp_path):
    t = torch.ones(2)
    obj = [
        {"a": (t, [t, {"deep": t}]), 1: None, (2, "x"): "tuple key"},
        {1, 2, 3},
        b"\x00\xffbytes",
        bytearray(b"ba"),
        3 + 4j,
        2**100,
        float("inf"),
        torch.Size([2, 3]),
        torch.float16,
        torch.device("cpu"),
        collections.Counter("aab"),
        "üñí",
    ]
    _, got = roundtrip(obj, tmp_path / "nested.pt")
    assert got[0]["a"][0] is got[0]["a"][1][0]  # the same tensor object twice


def _dtypes():
    out = []
    for name in TORCH_ITEMSIZE:
        dt = getattr(torch, name, None)
        if dt is None:
            continue
        try:
            torch.empty(4, dtype=torch.uint8).view(dt)
            torch.save(torch.empty(4, dtype=torch.uint8).view(dt), io.BytesIO())
        except (RuntimeError, TypeError, KeyError):
            continue  # a dtype torch.save itself cannot write
        out.append(name)
    return out


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", _dtypes())
def test_every_dtype(tmp_path, name):
    raw = torch.randint(0, 256, (16,), dtype=torch.uint8)
    if name == "bool":
        raw = raw % 2
    t = raw.view(getattr(torch, name))
    path = tmp_path / f"{name}.pt"
    torch.save({"t": t, "v": t[2:]}, path)
    got = tensorfile.load(path)
    assert got["t"].dtype == t.dtype
    assert torch.equal(got["t"].view(torch.uint8), raw)
    assert got["v"].storage_offset() == t[2:].storage_offset()


def test_flipped_byte_is_caught_where_torch_load_is_silent(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    (nlen, elen) = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + nlen + elen + 123] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path)["w"], torch.zeros(1000))  # torch.load: silently wrong
    with pytest.raises(ChecksumError, match=r"x\.pt.*zip CRC-32"):
        tensorfile.load(path)
    with pytest.raises(ChecksumError):
        tensorfile.load(path, mmap=True)
    with tensorfile.open(path) as f, pytest.raises(ChecksumError):
        f.get("w")
    assert not torch.equal(tensorfile.load(path, verify=False)["w"], torch.zeros(1000))


class _Evil:
    def __init__(self, call, *args):
        self.call = call
        self.args = args

    def __reduce__(self):
        return (self.call, self.args)


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: _Evil(os.system, f"touch {marker}"),
        lambda marker: _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: _Evil(exec, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: _Evil(subprocess.call, ["touch", str(marker)]),
    ],
    ids=["os.system", "eval", "exec", "subprocess.call"],
)
def test_forbidden_global_is_refused_and_never_called(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": make(marker)}, path)
    assert not marker.exists()
    with pytest.raises(FormatError, match=r"evil\.pt.*names the global .*(system|eval|exec|call)"):
        tensorfile.load(path)
    with pytest.raises(FormatError):
        tensorfile.open(path)
    assert not marker.exists()
    # and the same file really does run code under plain pickle rules
    torch.load(path, weights_only=False)
    assert marker.exists()


def _zip_with_pickle(path, body):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hand/data.pkl", body)
    return path


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\x80\x02cbuiltins\ngetattr\n.", "builtins.getattr"),
        (b"\x80\x02(S'touch MARKER'\nios\nsystem\n.", "os.system"),
        (b"\x80\x02ctorch\nTensor\nK\x05\x85R.", "not a valid torch.save pickle"),
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)K\x00\x89NtR.", "not a storage"),
        (b"\x80\x02(S'x'\nS'cpu'\nQ.", "persistent id"),
    ],
    ids=["getattr", "inst-os.system", "tensor-constructor", "fake-storage", "bad-persid"],
)
def test_hand_made_pickle_opcodes_cannot_reach_other_objects(tmp_path, body, match):
    marker = tmp_path / "pwned"
    path = _zip_with_pickle(tmp_path / "hand.pt", body.replace(b"MARKER", str(marker).encode()))
    with pytest.raises(FormatError, match=match) as e:
        tensorfile.load(path)
    assert "hand.pt" in str(e.value)
    assert not marker.exists()


def test_build_on_an_ordered_dict_only_sets_attributes(tmp_path):
    path = _zip_with_pickle(
        tmp_path / "od.pt", b"\x80\x02ccollections\nOrderedDict\n)R}S'x'\nK\x01sb."
    )
    got = tensorfile.load(path)
    assert type(got) is collections.OrderedDict and got.x == 1 and not got


def test_map_location_forms(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    for loc in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, where: s):
        assert torch.equal(tensorfile.load(path, map_location=loc)["w"], torch.arange(4.0))
    with pytest.raises(RuntimeError, match="CUDA"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        tensorfile.load(path, map_location="cuda")


def test_streams_mmap_and_lazy_access(tmp_path):
    path = tmp_path / "s.pt"
    obj = {"a": torch.randn(50, 3), "b": {"c": torch.arange(10)}}
    torch.save(obj, path)
    same(obj, tensorfile.load(io.BytesIO(path.read_bytes())))
    same(obj, tensorfile.load(path, mmap=True))
    with tensorfile.open(path) as f:
        assert f.format == "torch.save" and f.keys() == ["a", "b.c"]
        assert torch.equal(f.get("b.c"), obj["b"]["c"])
        same(obj, f.load())

    class Pipe(io.BytesIO):
        def seekable(self):
            return False

    with pytest.raises(ValueError, match="seekable"):
        tensorfile.load(Pipe(path.read_bytes()))


@pytest.mark.parametrize("cut", [10, 100, -10, -30, -100])
def test_truncated_or_damaged_zip_is_a_format_error(tmp_path, cut):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(FormatError, match=r"t\.pt"):
        tensorfile.load(path)


def test_central_directory_lies_are_caught(tmp_path):
    path = tmp_path / "lie.pt"
    torch.save({"w": torch.ones(64)}, path)
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # last central entry: point its local header elsewhere
    struct.pack_into("<I", data, cd + 42, 1)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"lie\.pt.*(local header|overlap)"):
        tensorfile.load(path)


def _edited_copy(path, out, suffix, edit):
    """A copy of the torch.save zip at `path` written to `out`, the record whose name
    ends with `suffix` replaced by edit(its bytes), which must change them."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith(suffix):
                edited = edit(body)
                assert edited != body
                body = edited
            z.writestr(info.filename, body)


@pytest.mark.parametrize("mmap", [False, True])
def test_records_in_another_order_than_the_pickle_names_them(tmp_path, mmap):
    """Storages are numbered in the order the pickle meets them; a zip may hold their
    records in any order (here the reverse), which the reads must not care about."""
    obj = {"a": torch.arange(6), "b": torch.ones(3, dtype=torch.float64), "c": torch.arange(4.0)}
    torch.save(obj, tmp_path / "fwd.pt")
    out = tmp_path / "rev.pt"
    with zipfile.ZipFile(tmp_path / "fwd.pt") as src, zipfile.ZipFile(out, "w") as z:
        infos = src.infolist()
        data = sorted((i for i in infos if "/data/" in i.filename), key=lambda i: i.filename)
        rest = [i for i in infos if "/data/" not in i.filename]
        for info in rest[:1] + data[::-1] + rest[1:]:
            z.writestr(info.filename, src.read(info))
    with zipfile.ZipFile(out) as z:
        order = [i.filename.rsplit("/", 1)[1] for i in z.infolist() if "/data/" in i.filename]
    assert order == ["2", "1", "0"]
    same(tensorfile.load(out, mmap=mmap), torch.load(out, weights_only=True))
    with tensorfile.open(out) as f:
        assert torch.equal(f.get("c"), obj["c"])


def test_storage_size_must_match_the_pickle(tmp_path):
    path = tmp_path / "short.pt"
    torch.save({"w": torch.ones(8)}, path)
    out = tmp_path / "re.pt"
    _edited_copy(path, out, "/data/0", lambda body: body[:16])
    with pytest.raises(FormatError, match=r"re\.pt.*holds 16 bytes but its pickle entry needs 32"):
        tensorfile.load(out)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "oob.pt"
    torch.save({"w": torch.ones(4)}, path)
    out = tmp_path / "oob2.pt"
    # shape (4,) -> (9,): the BININT1 before TUPLE1 of the size
    _edited_copy(path, out, "data.pkl", lambda pkl: pkl.replace(b"K\x04\x85", b"K\x09\x85", 1))
    with pytest.raises(FormatError, match="reaches byte 36"):
        tensorfile.load(out)


def test_zip_crc_of_zero_means_not_recorded(tmp_path):
    # torch.serialization.config.save.compute_crc32 = False writes CRC 0 for every record
    cfg = torch.utils.serialization.config.save
    old = cfg.compute_crc32
    cfg.compute_crc32 = False
    try:
        torch.save({"w": torch.arange(5)}, tmp_path / "nocrc.pt")
    finally:
        cfg.compute_crc32 = old
    assert torch.equal(tensorfile.load(tmp_path / "nocrc.pt")["w"], torch.arange(5))


def test_faster_path_gives_identical_results_on_many_tensors(tmp_path):
    obj = {f"layer{i}": {"w": torch.randn(i % 7 + 1, 3), "b": torch.randn(3)} for i in range(300)}
    roundtrip(obj, tmp_path / "many.pt")


def test_loading_needs_no_numpy_pickle_support(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "np.pt"
    torch.save({"a": np.arange(3)}, path)
    with pytest.raises(FormatError, match="numpy"):
        tensorfile.load(path)


def test_cli_subprocess_refuses_evil_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_Evil(os.system, f"touch {marker}"), path)
    r = subprocess.run(
        [sys.executable, "-m", "tensorfile", "verify", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "system" in (r.stdout + r.stderr)
    assert not marker.exists()


def test_a_view_smaller_than_its_storage_keeps_the_whole_storage(tmp_path):
    # torch.save writes whole storages: loading must neither lose nor overrun them
    x = torch.arange(1000.0)
    path = tmp_path / "head.pt"
    torch.save({"head": x[:2], "strided": torch.arange(64.0)[::4][:3]}, path)
    got = tensorfile.load(path)
    assert torch.equal(got["head"], x[:2]) and got["head"].untyped_storage().nbytes() == 4000
    assert torch.equal(got["strided"], torch.tensor([0.0, 4.0, 8.0]))
    assert got["strided"].untyped_storage().nbytes() == 256


def test_a_huge_shape_over_zero_strides_is_refused(tmp_path):
    # shape (2**40, 2**40) with strides (0, 0) stays inside a 1-element storage
    path = tmp_path / "huge.pt"
    torch.save({"w": torch.ones(1).expand(7, 5)}, path)
    big = b"\x8a\x06\x00\x00\x00\x00\x00\x01"  # LONG1: 6 bytes, 2**40
    out = tmp_path / "huge2.pt"
    _edited_copy(
        path, out, "data.pkl", lambda pkl: pkl.replace(b"K\x07K\x05\x86", big + big + b"\x86", 1)
    )
    with pytest.raises(FormatError, match="more elements"):
        tensorfile.load(out)
    with pytest.raises(FormatError, match="more elements"):
        tensorfile.open(out)


def test_a_zip_whose_directory_lists_nothing_is_refused(tmp_path):
    path = tmp_path / "nothing.pt"
    torch.save({"w": torch.ones(2)}, path)
    data = bytearray(path.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHII", data, eocd + 8, 0, 0, 0, eocd)  # no entries, an empty directory
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"nothing\.pt"):
        tensorfile.load(path)
