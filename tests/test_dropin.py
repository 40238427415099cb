"""torch.load's arguments and habits: weights_only, mmap, pickle_module and pickle_load_args
accepted or refused with a reason, map_location="meta" without reading a byte, and the
messages a new user meets first (saving a module, a missing CUDA device, inspect, demo)."""

from __future__ import annotations

import collections
import inspect
import io
import pickle
import struct
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import tensorfile  # noqa: E402
from _util import assert_same  # noqa: E402


def _state() -> dict[str, Any]:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd: dict[str, Any] = {
        "w": w,
        "row": w[1],  # a view: shares w's storage at an offset
        "wt": w.t(),  # strided
        "bf16": torch.linspace(-2, 2, 5).to(torch.bfloat16),
        "fp8": torch.linspace(-1, 1, 4).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False, True]),
        "p": torch.nn.Parameter(torch.ones(2)),
        "step": 7,
    }
    return sd


def _files(tmp_path: Path) -> dict[str, Path]:
    sd = _state()
    paths = {"tensorfile": tmp_path / "s.tf", "torch.save": tmp_path / "s.pt"}
    tensorfile.save(sd, paths["tensorfile"])
    torch.save(sd, paths["torch.save"])
    flat = {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor) and k != "row"}
    paths["safetensors"] = tmp_path / "s.safetensors"
    tensorfile.save_safetensors(flat, paths["safetensors"], copy_shared=True)
    return paths


# --------------------------------------------------------------------------- item 13


def test_every_torch_load_parameter_is_accepted_by_name() -> None:
    ours = inspect.signature(tensorfile.load).parameters
    for name, param in inspect.signature(torch.load).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
        else:
            assert name in ours, name
            assert ours[name].kind == param.kind, name
    # the same positional order as torch.load: f, map_location, pickle_module
    assert list(ours)[:3] == ["f", "map_location", "pickle_module"]


@pytest.mark.parametrize("weights_only", [True, False, None])
def test_weights_only_loads_the_same(tmp_path: Path, weights_only: Any) -> None:
    for path in _files(tmp_path).values():
        want = tensorfile.load(path)
        assert_same(want, tensorfile.load(path, weights_only=weights_only), str(path))
        assert_same(want, tensorfile.load(path, "cpu", None, weights_only=weights_only))


def test_mmap_none_is_false_and_true_maps(tmp_path: Path) -> None:
    path = _files(tmp_path)["torch.save"]
    want = torch.load(path, weights_only=True)
    assert_same(want, tensorfile.load(path, mmap=None))
    assert_same(want, tensorfile.load(path, mmap=True, weights_only=True))
    with pytest.raises(TypeError, match="mmap must be True, False or None"):
        tensorfile.load(path, mmap="yes")


def test_pickle_module_other_than_pickle_is_refused(tmp_path: Path) -> None:
    path = _files(tmp_path)["torch.save"]
    assert_same(torch.load(path, weights_only=True), tensorfile.load(path, pickle_module=pickle))
    dill = types.ModuleType("dill")
    with pytest.raises(ValueError, match=r"pickle_module=dill .*never unpickles arbitrary"):
        tensorfile.load(path, pickle_module=dill)
    with pytest.raises(ValueError, match="pickle_module"):
        tensorfile.load(path, None, dill)


def test_pickle_load_args_encoding_only(tmp_path: Path) -> None:
    path = _files(tmp_path)["torch.save"]
    # torch.load warns that pickle_load_args need weights_only=False; encoding changes
    # only Python 2 strings, which a torch.save zip never holds
    want = torch.load(path, weights_only=True)
    assert_same(want, tensorfile.load(path, encoding="latin1"))
    with pytest.raises(TypeError, match=r"'errors'.*only encoding= is accepted"):
        tensorfile.load(path, errors="strict")
    with pytest.raises(TypeError, match="encoding must be a str"):
        tensorfile.load(path, encoding=1)
    with pytest.raises(TypeError, match="weights_only must be"):
        tensorfile.load(path, weights_only="yes")


# --------------------------------------------------------------------------- item 14


class _CountingStream(io.BytesIO):
    """Counts the bytes handed out, however they are asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.nread = 0

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        self.nread += len(out)
        return out

    def readinto(self, b: Any) -> int:
        n = super().readinto(b)
        self.nread += n
        return n


def _meta_matches(cpu: Any, meta: Any, path: str) -> None:
    if isinstance(cpu, torch.Tensor):
        assert meta.device.type == "meta", path
        assert type(meta) is type(cpu), path
        assert (meta.dtype, meta.shape, meta.stride()) == (cpu.dtype, cpu.shape, cpu.stride()), path
        assert meta.storage_offset() == cpu.storage_offset(), path
        assert meta.untyped_storage().nbytes() == cpu.untyped_storage().nbytes(), path
        assert meta.requires_grad == cpu.requires_grad, path
    elif isinstance(cpu, dict):
        assert list(meta) == list(cpu), path
        for k in cpu:
            _meta_matches(cpu[k], meta[k], f"{path}.{k}")
    else:
        assert meta == cpu, path


@pytest.mark.parametrize("where", ["meta", "device", "dict"])
def test_meta_map_location_for_every_format(tmp_path: Path, where: str) -> None:
    ml: Any = {"meta": "meta", "device": torch.device("meta"), "dict": {"cpu": "meta"}}[where]
    for fmt, path in _files(tmp_path).items():
        cpu = tensorfile.load(path)
        got = tensorfile.load(path, map_location=ml, weights_only=True)
        _meta_matches(cpu, got, fmt)
        if fmt != "safetensors":  # views of one storage stay views of one storage
            assert got["row"].untyped_storage()._cdata == got["w"].untyped_storage()._cdata
            assert got["wt"].untyped_storage()._cdata == got["w"].untyped_storage()._cdata
        with tensorfile.open(path) as f:
            t = f.get("bf16", map_location=ml)
            assert (t.device.type, t.dtype, t.shape) == ("meta", torch.bfloat16, (5,))
            assert f.get("mask", map_location=ml).device.type == "meta"
            _meta_matches(cpu, f.load(map_location=ml), fmt)


def test_meta_reads_no_tensor_bytes(tmp_path: Path) -> None:
    big = {"big": torch.ones(1 << 20), "step": 1}  # 4 MiB of tensor bytes
    for path in (tmp_path / "b.tf", tmp_path / "b.pt", tmp_path / "b.safetensors"):
        if path.suffix == ".tf":
            tensorfile.save(big, path)
        elif path.suffix == ".pt":
            torch.save(big, path)
        else:
            tensorfile.save_safetensors({"big": big["big"]}, path)
        stream = _CountingStream(path.read_bytes())
        got = tensorfile.load(stream, map_location="meta")
        assert got["big"].device.type == "meta" and got["big"].shape == (1 << 20,)
        assert stream.nread < 256 << 10, (path.suffix, stream.nread)


def test_meta_skips_damaged_bytes_that_a_real_load_refuses(tmp_path: Path) -> None:
    path = tmp_path / "d.tf"
    tensorfile.save({"w": torch.ones(1024)}, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the one storage
    path.write_bytes(bytes(data))
    with pytest.raises(tensorfile.ChecksumError):
        tensorfile.load(path)
    assert tensorfile.load(path, map_location="meta")["w"].shape == (1024,)


def _saved_from_cuda(
    obj: Any, path: Path, monkeypatch: pytest.MonkeyPatch, which: Any = None
) -> None:
    """torch.save of CPU tensors, recorded as saved from cuda:0 (all, or the storages of
    the tensors in `which`), as a GPU machine would have written them."""
    real = torch.serialization.location_tag
    ptrs = None if which is None else {t.untyped_storage().data_ptr() for t in which}

    def tag(storage: Any) -> str:
        return "cuda:0" if ptrs is None or storage.data_ptr() in ptrs else real(storage)

    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", tag)
        torch.save(obj, path)


def test_dict_map_location_sends_some_storages_to_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = torch.arange(4.0), torch.arange(3)
    path = tmp_path / "mixed.pt"
    _saved_from_cuda({"a": a, "b": b}, path, monkeypatch, which=[a])
    got = tensorfile.load(path, map_location={"cuda:0": "meta"})
    assert got["a"].device.type == "meta" and got["a"].shape == (4,)
    assert got["b"].device.type == "cpu" and torch.equal(got["b"], b)


# --------------------------------------------------------------------------- item 17


def test_saving_a_module_suggests_its_state_dict(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 3)
    with pytest.raises(TypeError, match=r"save its state_dict\(\) instead"):
        tensorfile.save({"net": net}, tmp_path / "net.tf")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"'opt'.*save its state_dict\(\) instead"):
        tensorfile.save({"opt": opt}, tmp_path / "opt.tf")
    with pytest.raises(TypeError) as e:  # other objects get no such hint
        tensorfile.save({"x": object()}, tmp_path / "x.tf")
    assert "state_dict" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_message_says_what_map_location_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = torch.arange(4.0)
    path = tmp_path / "gpu.pt"
    _saved_from_cuda({"t": t}, path, monkeypatch)
    with pytest.raises(RuntimeError, match=r"saved from cuda:0, and map_location=None keeps"):
        tensorfile.load(path)
    with pytest.raises(RuntimeError, match=r"map_location='cuda:1' sends every storage there"):
        tensorfile.load(path, map_location="cuda:1")
    with pytest.raises(RuntimeError, match=r"map_location=\{'cuda:0': 'cuda:1'\} maps it there"):
        tensorfile.load(path, map_location={"cuda:0": "cuda:1"})
    with tensorfile.open(path) as f, pytest.raises(RuntimeError, match=r"gpu\.pt.*map_location"):
        f.get("t")
    assert torch.equal(tensorfile.load(path, map_location="cpu")["t"], t)


def test_inspect_says_what_the_version_counts(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from tensorfile.cli import main

    paths = _files(tmp_path)
    runner = CliRunner()
    first = {
        fmt: runner.invoke(main, ["inspect", str(p)]).output.splitlines()[0]
        for fmt, p in paths.items()
    }
    assert first["torch.save"].startswith(
        f"{paths['torch.save']}: torch.save zip, archive version 3,"
    )
    assert first["tensorfile"].startswith(f"{paths['tensorfile']}: tensorfile 1.")
    assert first["safetensors"].startswith(f"{paths['safetensors']}: safetensors, ")


def test_demo_names_no_directory_it_deletes() -> None:
    from tensorfile import _demo

    lines: list[str] = []
    _demo.run(None, 1, 1, echo=lines.append)
    out = "\n".join(lines)
    assert "tensorfile-demo-" not in out, out
    assert "(files written: mlp.params, mydict, x-file, x-files; in a temporary directory" in out


# --------------------------------------------------------------------------- item 15


def _diff(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner
    from tensorfile.cli import main

    r = CliRunner().invoke(main, ["diff", *args])
    return r.exit_code, r.output


def _checkpoint(step: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = lr  # the schedule moved on; the tensors are the same
    return {"model": m.state_dict(), "optim": opt.state_dict(), "step": step, "lr": lr}


def test_diff_compares_plain_values_too(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.tf"
    torch.save(_checkpoint(10, 1e-3), a)
    tensorfile.save(_checkpoint(11, 2e-3), b)
    code, out = _diff(str(a), str(b))
    assert code == 1, out
    assert "differs:   step: int 10 -> int 11" in out, out
    assert "differs:   lr: float 0.001 -> float 0.002" in out, out
    # the optimizer's param_groups hold the lr too
    assert "differs:   optim.param_groups.0.lr: float 0.001 -> float 0.002" in out, out
    assert "; 3 other value(s) differ" in out, out
    code, out = _diff(str(a), str(b), "--tensors-only")  # the old comparison
    assert code == 0 and "0 with different values" in out, out
    # the same checkpoint in two formats is identical, values and all
    same = tmp_path / "same.tf"
    tensorfile.save(_checkpoint(10, 1e-3), same)
    code, out = _diff(str(a), str(same))
    assert code == 0, out


def test_diff_reports_types_and_structure(tmp_path: Path) -> None:
    import collections

    t = torch.arange(3.0)
    a = {
        "n": 1,
        "seq": [1, 2],
        "od": collections.OrderedDict(x=1),
        "p": torch.nn.Parameter(t.clone()),
        "sub": {"k": 1},
        "gone": {"deep": {"t": t, "v": 2}},
        "empty": {},
        "nan": float("nan"),
    }
    b = {
        "n": 1.0,
        "seq": (1, 2),
        "od": {"x": 1},
        "p": t.clone(),
        "sub": [1],
        "new": None,
        "empty": [],
        "nan": float("nan"),
    }
    pa, pb = tmp_path / "a.tf", tmp_path / "b.pt"
    tensorfile.save(a, pa)
    torch.save(b, pb)
    code, out = _diff("--json", str(pa), str(pb))
    assert code == 1
    import json

    report = json.loads(out)
    values = {v["key"]: (v["a"], v["b"]) for v in report["values"]}
    assert values == {
        "n": ("int 1", "float 1.0"),
        "seq": ("list of 2", "tuple of 2"),
        "od": ("OrderedDict of 1", "dict of 1"),
        "p": ("torch Parameter requiring grad float32[3]", "torch float32[3]"),
        "sub": ("dict of 1", "list of 1"),
        "empty": ("dict {}", "list []"),
    }, values
    # a subtree the other side lacks entirely is named once; "sub"'s children by path
    assert report["only_in_a"] == ["sub.k", "gone"], report
    assert report["only_in_b"] == ["sub.0", "new"], report


def test_diff_holds_one_tensor_pair_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import weakref

    from tensorfile import _diff as diff_module

    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(8)}
    pa, pb = tmp_path / "a.tf", tmp_path / "b.safetensors"
    tensorfile.save(sd, pa)
    tensorfile.save_safetensors(sd, pb)
    alive: list[Any] = []
    most = 0
    real = diff_module._Side.tensor

    def tensor(self: Any, i: int) -> Any:
        nonlocal most
        most = max(most, sum(r() is not None for r in alive))
        out = real(self, i)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(diff_module._Side, "tensor", tensor)
    report = diff_module.diff(str(pa), str(pb))
    assert report["identical"] and len(alive) == 16
    assert most <= 1  # at each read, at most the pair's other tensor is still alive


def test_diff_of_a_pickle_sharing_containers_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorfile import _diff as diff_module

    node: Any = [torch.zeros(1)]
    for _ in range(40):  # 2**40 key paths through one small pickle
        node = [node, node]
    path = tmp_path / "shared.pt"
    torch.save({"x": node}, path)
    monkeypatch.setattr(diff_module, "MAX_DIFF_VALUES", 10_000)
    code, out = _diff(str(path), str(path))
    assert code == 1 and "more than 10,000 values" in out and "--tensors-only" in out, out
    assert "Traceback" not in out
    code, out = _diff(str(path), str(path), "--tensors-only")
    assert code == 0, out


# --------------------------------------------------------------------------- item 16


def _convert_cli(*args: str) -> Any:
    from click.testing import CliRunner
    from tensorfile.cli import main

    return CliRunner().invoke(main, ["convert", *args])


def _rich_state() -> collections.OrderedDict[str, Any]:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd: collections.OrderedDict[str, Any] = collections.OrderedDict(
        w=w,
        row=w[1],
        wt=w.t(),
        bf16=torch.linspace(-2, 2, 5).to(torch.bfloat16),
        fp8=torch.linspace(-1, 1, 4).to(torch.float8_e4m3fn),
        e5m2=torch.linspace(-1, 1, 4).to(torch.float8_e5m2),
        u16=torch.arange(3).to(torch.uint16),
        mask=torch.tensor([True, False, True]),
        p=torch.nn.Parameter(torch.ones(2)),
        g=torch.ones(2, requires_grad=True),
        c=torch.ones(2, dtype=torch.complex64) * (1 + 2j),
        empty=torch.zeros(0, 3),
        scalar=torch.tensor(3.5, dtype=torch.float64),
        step=7,
        sz=torch.Size([2, 3]),
        dt=torch.bfloat16,
        dev=torch.device("cpu"),
        plain=[(1, "x\udc80", b"b", bytearray(b"q"), 1j, None, float("inf"), 2**80)],
    )
    sd["tied"] = sd["w"]  # the same tensor twice
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return sd


def _same_storage(a: Any, b: Any) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


@pytest.mark.parametrize("source", ["tensorfile", "torch.save", "safetensors"])
def test_convert_to_a_torch_save_file(tmp_path: Path, source: str) -> None:
    import zipfile

    sd = _rich_state()
    src = tmp_path / {"tensorfile": "s.tf", "torch.save": "s.pt", "safetensors": "s.st"}[source]
    if source == "tensorfile":
        sd["m8"] = torch.arange(8).to(torch.uint8)
        sd["m32"] = sd["m8"].view(torch.int32)  # one storage, two dtypes (torch.save refuses)
        tensorfile.save(sd, src)
    elif source == "torch.save":
        sd["conj"] = (torch.ones(2, dtype=torch.complex64) * 1j).conj()  # a lazy conj view
        torch.save(sd, src)
    else:
        flat = {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        del flat["row"], flat["wt"], flat["tied"]
        tensorfile.save_safetensors(flat, src)
    out = tmp_path / "out.pt"
    r = _convert_cli(str(src), str(out))  # .pt: a torch.save file by default
    assert r.exit_code == 0 and "(torch.save) from" in r.output, r.output
    want = tensorfile.load(src)
    got = torch.load(out, weights_only=True)
    assert_same(want, got)
    assert_same(want, tensorfile.load(out))  # and it reads back here, CRC-32s checked
    assert zipfile.ZipFile(out).testzip() is None  # every record's CRC-32 is right
    if source != "safetensors":
        assert _same_storage(got["row"], got["w"]) and _same_storage(got["wt"], got["w"])
        assert got["tied"] is got["w"] and type(got["p"]) is torch.nn.Parameter
        assert got._metadata == {"": {"version": 1}}
    if source == "tensorfile":
        assert _same_storage(got["m32"], got["m8"])
    if source == "torch.save":
        assert got["conj"].is_conj() and torch.equal(got["conj"], sd["conj"])
    mapped = torch.load(out, weights_only=True, mmap=True)
    assert_same(got, mapped)


def test_torch_save_records_are_aligned_and_zip64_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    from tensorfile.formats import torchzip_writer

    sd = {"a": torch.arange(5, dtype=torch.int16), "b": torch.ones(3, 7), "n": 1}
    src = tmp_path / "s.tf"
    tensorfile.save(sd, src)
    for limit in (torchzip_writer.ZIP64_LIMIT, 0):  # 0: zip64 fields on every record
        monkeypatch.setattr(torchzip_writer, "ZIP64_LIMIT", limit)
        out = tmp_path / f"out{limit}.pt"
        assert _convert_cli(str(src), str(out), "--to", "torch").exit_code == 0
        raw = out.read_bytes()
        z = zipfile.ZipFile(out)
        assert z.testzip() is None
        for info in z.infolist():
            nlen, elen = struct.unpack_from("<HH", raw, info.header_offset + 26)
            data = info.header_offset + 30 + nlen + elen
            assert data % 64 == 0, info.filename
            assert raw[data : data + info.file_size] == z.read(info)
        assert (b"PK\x06\x06" in raw) == (limit == 0)
        assert_same(sd, torch.load(out, weights_only=True))
        assert_same(sd, tensorfile.load(out))


def test_large_storages_stream_in_chunks(tmp_path: Path) -> None:
    from tensorfile import _convert
    from tensorfile._reader import open_reader

    sd = {"big": torch.randn(5000), "small": torch.arange(3), "view": None}
    sd["view"] = sd["big"][10:20]
    for src, save in ((tmp_path / "s.tf", tensorfile.save), (tmp_path / "s.pt", torch.save)):
        save(sd, src)
        out = tmp_path / "out.pt"
        with open_reader(str(src)) as reader:  # a 4 KiB buffer: "big" comes in 5 chunks
            stream = _convert.StorageStream(reader, 2, chunk_nbytes=4096)
            _convert._to_torch(reader, str(out), stream, lambda n: None)
        got = torch.load(out, weights_only=True)
        assert_same(sd, got)
        assert _same_storage(got["view"], got["big"])


def test_torch_save_target_refuses_what_torch_load_cannot_read(tmp_path: Path) -> None:
    import numpy as np

    for name, obj in {
        "array": {"x": {"arr": np.arange(3)}},
        "npscalar": {"x": {"lr": np.float32(0.5)}},
    }.items():
        src = tmp_path / f"{name}.tf"
        tensorfile.save(obj, src)
        out = tmp_path / f"{name}.pt"
        r = _convert_cli(str(src), str(out))
        assert r.exit_code == 1 and "x." in r.output and "weights_only=True" in r.output, r.output
        assert not out.exists()


def test_convert_to_safetensors_warns_of_copies(tmp_path: Path) -> None:
    w = torch.randn(4, 8)
    src = tmp_path / "tied.tf"
    tensorfile.save({"emb": w, "head": w, "wt": w.t(), "half": w[:2], "own": torch.ones(3)}, src)
    from click.testing import CliRunner
    from tensorfile.cli import main

    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    # emb, head and wt each hold w's 128 bytes, half 64 of them: 448 bytes for 128
    assert "4 tensors that share storage (emb, head, wt, half)" in r.stderr, r.stderr
    assert "adding 320 bytes" in r.stderr, r.stderr
    r = CliRunner().invoke(
        main, ["convert", str(tmp_path / "o.safetensors"), str(tmp_path / "o2.safetensors")]
    )
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_a_failed_conversion_to_torch_leaves_the_old_file(tmp_path: Path) -> None:
    src = tmp_path / "d.tf"
    tensorfile.save({"w": torch.ones(1024)}, src)
    data = bytearray(src.read_bytes())
    data[-5] ^= 0xFF  # inside the storage: found while streaming it
    src.write_bytes(bytes(data))
    out = tmp_path / "out.pt"
    torch.save({"old": torch.zeros(1)}, out)
    before = out.read_bytes()
    r = _convert_cli(str(src), str(out))
    assert r.exit_code == 1 and "checksum mismatch" in r.output, r.output
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tftmp")] == []
