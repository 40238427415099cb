"""Loads to and saves from real CUDA devices: map_location forms, multi-device saves,
pinned CPU loads, GPUDirect Storage settings and damage detection on the GPU path."""

from __future__ import annotations

import io

import pytest
import tensorfile
import torch
from _util import tensor_bytes
from tensorfile import ChecksumError, FormatError, _cuda, _engine, _io
from test_format_rules import Crafted

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tensorfile.cuda_available(), reason="needs a CUDA device"),
]

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(NGPU < 2, reason="needs two CUDA devices")


def state(device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 300, generator=g).to(device)  # views below share its storage
    obj = {
        "w": w,
        "view": w[10:20, 5:],  # shares w's storage
        "t": w.t(),
        "bf16": torch.randn(1000, 1000, generator=g).to(torch.bfloat16),
        "small": [torch.arange(i + 1, dtype=torch.int16) for i in range(200)],
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
        "step": 7,
    }
    return {k: _to(v, device) for k, v in obj.items()}


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, list):
        return [_to(x, device) for x in v]
    return v


def devices_of(obj) -> set[str]:
    out = set()
    for v in obj.values():
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, torch.Tensor):
                out.add(str(t.device))
    return out


def assert_values(a, b, device: str | None = None) -> None:
    """`b` holds `a`'s tensors (dtype, shape, strides, bytes), on `device` when given,
    and its plain values; compared without moving either to another device first."""
    assert type(b) is type(a)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_values(a[k], b[k], device)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_values(x, y, device)
    elif isinstance(a, torch.Tensor):
        assert (b.dtype, b.shape, b.stride()) == (a.dtype, a.shape, a.stride())
        if device is not None:
            assert b.device == torch.device(device), b.device
        assert tensor_bytes(b) == tensor_bytes(a)
    else:
        assert b == a


@pytest.fixture
def spy(monkeypatch):
    """Counts the engine's device transfers, to show the direct path was taken."""
    calls = {"read": 0, "write": 0}
    real_r, real_w = _engine.device_read_regions, _engine.device_write_regions

    def r(*a, **k):
        calls["read"] += 1
        return real_r(*a, **k)

    def w(*a, **k):
        calls["write"] += 1
        return real_w(*a, **k)

    monkeypatch.setattr(_engine, "device_read_regions", r)
    monkeypatch.setattr(_engine, "device_write_regions", w)
    return calls


@pytest.mark.parametrize("where", ["cuda", "cuda:0", torch.device("cuda"), {"cpu": "cuda:0"}])
def test_load_to_cuda(tmp_path, spy, where):
    obj = state()
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf", map_location=where)
    assert spy["read"] >= 1
    assert devices_of(out) == {"cuda:0"}
    assert_values(obj, out, "cuda:0")
    assert out["view"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()


def test_saved_from_cuda_loads_back_on_its_device(tmp_path, spy):
    obj = state("cuda:0")
    tensorfile.save(obj, tmp_path / "m.tf")
    assert spy["write"] >= 1
    out = tensorfile.load(tmp_path / "m.tf")
    assert devices_of(out) == {"cuda:0"}
    assert_values(obj, out, "cuda:0")
    cpu = tensorfile.load(tmp_path / "m.tf", map_location={"cuda:0": "cpu"})
    assert devices_of(cpu) == {"cpu"}
    assert_values(obj, cpu, "cpu")


def test_saved_from_cuda_equals_saved_from_cpu(tmp_path):
    obj = state()
    tensorfile.save(obj, tmp_path / "cpu.tf")
    tensorfile.save(state("cuda:0"), tmp_path / "gpu.tf")
    with tensorfile.open(tmp_path / "cpu.tf") as a, tensorfile.open(tmp_path / "gpu.tf") as b:
        la, lb = a._reader.layout, b._reader.layout
        assert la.storage_crcs.tolist() == lb.storage_crcs.tolist()
        assert la.storage_offsets.tolist() == lb.storage_offsets.tolist()


def test_callable_map_location(tmp_path):
    obj = state("cuda:0")
    tensorfile.save(obj, tmp_path / "m.tf")
    seen = []

    def where(storage, location):
        seen.append(location)
        return storage.cuda(0)

    out = tensorfile.load(tmp_path / "m.tf", map_location=where)
    assert set(seen) == {"cuda:0"}
    assert devices_of(out) == {"cuda:0"}
    assert_values(obj, out, "cuda:0")
    out = tensorfile.load(tmp_path / "m.tf", map_location=lambda s, loc: None)
    assert devices_of(out) == {"cuda:0"}


def test_missing_device_is_named_and_map_location_suggested(tmp_path):
    two = Crafted(tmp_path / "two.tf", {"a": torch.arange(3, dtype=torch.int32)})
    h = two.edited()
    h["storages"][0][2] = f"cuda:{NGPU}"
    two.write(h)
    with pytest.raises(RuntimeError, match=rf"meant for cuda:{NGPU}.*map_location"):
        tensorfile.load(two.path)
    out = tensorfile.load(two.path, map_location={f"cuda:{NGPU}": "cuda:0"})
    assert out["a"].device == torch.device("cuda:0")


def test_lazy_get_to_cuda(tmp_path, spy):
    obj = state()
    tensorfile.save(obj, tmp_path / "m.tf")
    with tensorfile.open(tmp_path / "m.tf") as f:
        t = f.get("bf16", map_location="cuda")
    assert t.device.type == "cuda" and spy["read"] == 1
    assert torch.equal(t.cpu(), obj["bf16"])


def test_many_small_tensors_round_trip(tmp_path):
    obj = {
        f"t{i}": torch.full((i % 97 + 1,), i, dtype=torch.int32, device="cuda") for i in range(5000)
    }
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf", map_location="cuda")
    for k, v in obj.items():
        assert torch.equal(out[k], v)


def test_save_to_a_stream_from_cuda(tmp_path):
    obj = state("cuda:0")
    buf = io.BytesIO()
    tensorfile.save(obj, buf)
    buf.seek(0)
    assert_values(obj, tensorfile.load(buf, map_location="cpu"), "cpu")


def test_pin_memory(tmp_path):
    obj = state()
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf", pin_memory=True)
    assert out["w"].is_pinned() and out["bf16"].is_pinned()
    assert_values(obj, out, "cpu")


@pytest.mark.parametrize("mode", ["off", "auto", "on"])
def test_gds_modes(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("TENSORFILE_GDS", mode)
    obj = state("cuda:0")
    try:
        tensorfile.save(obj, tmp_path / "m.tf")
        out = tensorfile.load(tmp_path / "m.tf", map_location="cuda")
    except (RuntimeError, tensorfile.CudaError) as e:
        # Only "on" may refuse, and it must say why.
        assert mode == "on", e
        assert "GPUDirect" in str(e) or "cuFile" in str(e)
        return
    assert_values(obj, out, "cuda:0")


def test_checksum_failure_detected_on_the_gpu_path(tmp_path):
    obj = {"w": torch.randn(100_000, device="cuda")}
    path = tmp_path / "m.tf"
    tensorfile.save(obj, path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"m\.tf: storage 0 .*checksum mismatch"):
        tensorfile.load(path)
    out = tensorfile.load(path, verify=False)
    assert out["w"].device.type == "cuda"


def test_nonzero_padding_detected_on_the_gpu_path(tmp_path):
    path = tmp_path / "m.tf"
    tensorfile.save({"a": torch.ones(3, device="cuda"), "b": torch.ones(3, device="cuda")}, path)
    with tensorfile.open(path) as f:
        off = int(f._reader.layout.storage_offsets[0]) + 12
    raw = bytearray(path.read_bytes())
    raw[off + 100] = 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="padding"):
        tensorfile.load(path)


def test_staging_settings_do_not_change_results(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORFILE_STAGING_NBYTES", "4096")
    monkeypatch.setenv("TENSORFILE_STAGING_BUFFERS", "1")
    obj = state("cuda:0")
    tensorfile.save(obj, tmp_path / "m.tf", num_threads=3)
    out = tensorfile.load(tmp_path / "m.tf", num_threads=3)
    assert_values(obj, out, "cuda:0")
    _cuda.release_staging()


def test_reusable_entry_point(tmp_path):
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    path = tmp_path / "raw"
    path.write_bytes(data.numpy().tobytes())
    dst = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (100, 1 << 20, 5)]
    offs = [8192, 4096 * 3, 0]
    with open(path, "rb") as f:
        crcs = _io.read_regions_to_device(
            f.fileno(), str(path), [d.data_ptr() for d in dst], [d.numel() for d in dst], offs, 0
        )
    for d, o, c in zip(dst, offs, crcs.tolist()):
        want = data[o : o + d.numel()]
        assert torch.equal(d.cpu(), want)
        assert c == _engine.crc32c(want.numpy().tobytes())


@two_gpus
def test_multi_device_save_and_remap(tmp_path):
    obj = {"a": torch.randn(1000, device="cuda:0"), "b": torch.randn(2000, device="cuda:1")}
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf")
    assert out["a"].device == torch.device("cuda:0") and out["b"].device == torch.device("cuda:1")
    assert torch.equal(out["a"], obj["a"]) and torch.equal(out["b"], obj["b"])
    before = torch.cuda.current_device()
    out = tensorfile.load(tmp_path / "m.tf", map_location={"cuda:0": "cuda:1"})
    assert torch.cuda.current_device() == before  # the caller's device is left alone
    assert {str(t.device) for t in out.values()} == {"cuda:1"}
    assert torch.equal(out["a"].cpu(), obj["a"].cpu())


def test_numpy_arrays_stay_on_the_host_beside_cuda_tensors(tmp_path):
    import numpy as np

    obj = {
        "t": torch.arange(10, dtype=torch.float64),
        "a": np.arange(7, dtype=np.int32),
        "u": torch.ones(4),
    }
    tensorfile.save(obj, tmp_path / "m.tf")
    out = tensorfile.load(tmp_path / "m.tf", map_location="cuda")
    assert isinstance(out["a"], np.ndarray) and out["a"].tolist() == list(range(7))
    assert out["t"].device.type == "cuda" and torch.equal(out["t"].cpu(), obj["t"])
    assert torch.equal(out["u"].cpu(), obj["u"])


def test_torch_save_and_safetensors_files_load_straight_to_cuda(tmp_path, spy):
    from safetensors.torch import save_file

    obj = {"w": torch.randn(300, 200), "b": torch.arange(1000, dtype=torch.int32)}
    torch.save(obj, tmp_path / "m.pt")
    save_file(obj, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        before = spy["read"]
        out = tensorfile.load(tmp_path / name, map_location="cuda")
        assert spy["read"] > before, name
        for k, v in obj.items():
            assert out[k].device.type == "cuda" and torch.equal(out[k].cpu(), v), (name, k)
    # A damaged record is caught on the GPU path too (zip CRC-32 for torch.save files).
    raw = bytearray((tmp_path / "m.pt").read_bytes())
    at = raw.find(obj["b"].numpy().tobytes()[:64])
    raw[at + 40] ^= 1
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        tensorfile.load(tmp_path / "bad.pt", map_location="cuda")
