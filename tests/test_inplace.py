"""In-place loads: load(into=...) and load_model read tensors straight into the caller's
memory, keep the caller's objects, and refuse mismatches before reading a byte."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import tensorfile  # noqa: E402
from tensorfile._reader import open_reader  # noqa: E402


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _trained(seed: int):
    m = _model(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return m, opt


def _damage_first_storage(path) -> None:
    with open_reader(str(path)) as r:
        at = int(r.layout.storage_offsets[0])
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("fmt", ["tensorfile", "torch.save"])
def test_into_fills_the_callers_tensors_and_returns_them(tmp_path, fmt):
    m, opt = _trained(0)
    ckpt = {"model": m.state_dict(), "optim": opt.state_dict(), "step": 12, "lr": 0.5}
    path = tmp_path / ("c.tf" if fmt == "tensorfile" else "c.pt")
    (tensorfile.save if fmt == "tensorfile" else torch.save)(ckpt, path)
    m2, opt2 = _trained(1)
    into = {"model": m2.state_dict(), "optim": opt2.state_dict()}
    before = {k: (t, t.data_ptr()) for k, t in into["model"].items()}
    out = tensorfile.load(path, into=into)
    for k, (t, ptr) in before.items():
        assert out["model"][k] is t and t.data_ptr() == ptr
        assert torch.equal(t, ckpt["model"][k])
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert out["step"] == 12 and out["lr"] == 0.5
    s_out, s_in = out["optim"]["state"][0], into["optim"]["state"][0]
    assert s_out["exp_avg"] is s_in["exp_avg"]
    assert torch.equal(s_in["exp_avg"], ckpt["optim"]["state"][0]["exp_avg"])
    opt2.load_state_dict(out["optim"])


def test_into_a_safetensors_file(tmp_path):
    src = {"a": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.int16)}
    path = tmp_path / "s.safetensors"
    tensorfile.save_safetensors(src, path)
    dest = {"a": torch.zeros(3, 5), "b": torch.zeros(6, dtype=torch.int16)}
    out = tensorfile.load(path, into=dest)
    assert out["a"] is dest["a"] and torch.equal(dest["a"], src["a"])
    assert out["b"] is dest["b"] and torch.equal(dest["b"], src["b"])


def test_every_mismatch_is_named_before_any_byte_is_read(tmp_path):
    path = tmp_path / "m.tf"
    tensorfile.save({"w": torch.ones(4, 4), "b": torch.ones(4), "n": torch.ones(2)}, path)
    _damage_first_storage(path)  # a read would raise ChecksumError
    into = {"w": torch.zeros(4, 3), "b": torch.zeros(4, dtype=torch.float64), "n": torch.zeros(2)}
    with pytest.raises(ValueError) as e:
        tensorfile.load(path, into=into)
    msg = str(e.value)
    assert "2 tensor(s) do not fit" in msg
    assert "'w': the file has float32 [4, 4], the destination float32 [4, 3]" in msg
    assert "'b': the file has float32 [4], the destination float64 [4]" in msg
    assert torch.equal(into["n"], torch.zeros(2))  # nothing was read


def test_tensors_absent_from_into_are_allocated(tmp_path):
    path = tmp_path / "a.tf"
    src = {"x": torch.randn(3), "y": torch.randn(2), "z": [torch.arange(3)]}
    tensorfile.save(src, path)
    x = torch.zeros(3)
    out = tensorfile.load(path, into={"x": x, "other": torch.zeros(9)})
    assert out["x"] is x and torch.equal(x, src["x"])
    assert torch.equal(out["y"], src["y"]) and torch.equal(out["z"][0], src["z"][0])
    assert "other" not in out


def test_destinations_that_are_not_plain_copies_are_filled_after_the_read(tmp_path):
    base = torch.arange(20.0)
    src = {"view": base[2:8], "t": base.view(4, 5).t(), "c": torch.randn(3, 4)}
    path = tmp_path / "v.tf"
    tensorfile.save(src, path)
    c_dest = torch.zeros(4, 3).t()  # non-contiguous destination
    into = {"view": torch.zeros(6), "t": torch.zeros(5, 4), "c": c_dest}
    out = tensorfile.load(path, into=into)
    for k in into:
        assert out[k] is into[k] and torch.equal(into[k], src[k]), k


def test_a_shared_storage_lands_once_per_destination(tmp_path):
    w = torch.randn(6, 3)
    path = tmp_path / "tied.tf"
    tensorfile.save({"emb": w, "head": w}, path)  # one storage, two keys
    dest = torch.zeros(6, 3)
    out = tensorfile.load(path, into={"emb": dest, "head": dest})
    assert out["emb"] is dest and out["head"] is dest and torch.equal(dest, w)


def test_into_requires_grad_parameters(tmp_path):
    m, _ = _trained(0)
    path = tmp_path / "p.tf"
    tensorfile.save(dict(m.named_parameters()), path)
    m2 = _model(3)
    params = dict(m2.named_parameters())
    out = tensorfile.load(path, into=params)
    for k, p in params.items():
        assert out[k] is p and p.requires_grad and torch.equal(p, dict(m.named_parameters())[k])


def test_load_model_reads_a_prefixed_sub_tree(tmp_path):
    m, opt = _trained(0)
    path = tmp_path / "ck.tf"
    tensorfile.save({"model": m.state_dict(), "optim": opt.state_dict()}, path)
    m2 = _model(5)
    ptrs = [p.data_ptr() for p in m2.parameters()]
    result = tensorfile.load_model(m2, path, prefix="model.")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert [p.data_ptr() for p in m2.parameters()] == ptrs
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_load_model_strict_refuses_before_reading(tmp_path):
    m, _ = _trained(0)
    sd = m.state_dict()
    sd["extra"] = torch.ones(1)
    del sd["2.bias"]
    path = tmp_path / "partial.tf"
    tensorfile.save(sd, path)
    _damage_first_storage(path)
    m2 = _model(7)
    with pytest.raises(
        RuntimeError, match=r"missing keys \['2\.bias'\], unexpected keys \['extra'\]"
    ):
        tensorfile.load_model(m2, path)
    # not strict: the damaged storage is then read, and its checksum refuses it
    with pytest.raises(tensorfile.ChecksumError):
        tensorfile.load_model(m2, path, strict=False)
    clean = tmp_path / "clean.tf"
    tensorfile.save(sd, clean)
    got = tensorfile.load_model(m2, clean, strict=False)
    assert got.missing_keys == ["2.bias"] and got.unexpected_keys == ["extra"]
    assert torch.equal(m2[0].weight, m[0].weight)


def test_a_resume_in_place_is_bit_identical(tmp_path):
    """Three steps, a checkpoint, three more: a resumed run in place (model and optimizer
    loaded into the objects of a fresh process's run) takes bit-identical steps."""
    torch.manual_seed(0)
    data = [torch.randn(5, 4) for _ in range(6)]

    def step(m, opt, x):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()

    m = _model(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for x in data[:3]:
        step(m, opt, x)
    path = tmp_path / "r.tf"
    tensorfile.save({"model": m.state_dict(), "optim": opt.state_dict()}, path)
    for x in data[3:]:
        step(m, opt, x)

    m2 = _model(9)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    step(m2, opt2, torch.randn(5, 4))  # so the optimizer has state to load into
    out = tensorfile.load(path, into={"model": m2.state_dict(), "optim": opt2.state_dict()})
    opt2.load_state_dict(out["optim"])
    for x in data[3:]:
        step(m2, opt2, x)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_into_cannot_be_combined_with_mmap(tmp_path):
    path = tmp_path / "x.tf"
    tensorfile.save({"a": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="into= cannot be combined with mmap=True"):
        tensorfile.load(path, mmap=True, into={"a": torch.zeros(2)})
