"""A training checkpoint (model, Adam state, epoch, RNG state) restored into fresh objects
continues training bit for bit as the original does."""

from __future__ import annotations

import copy

import pytest
import tensorfile
import torch
from _util import assert_same
from torch import nn


def _model():
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Dropout(0.2),  # consumes the RNG: the restored RNG state matters
        nn.Linear(16, 4),
    )


def _train(model, opt, steps):
    """A few steps on random data drawn from torch's global RNG; returns the losses."""
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 8)
        y = torch.randint(0, 4, (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(state)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_resume_is_bit_identical(tmp_path, deterministic, amsgrad):
    torch.manual_seed(1234)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4, amsgrad=amsgrad)
    _train(model, opt, 3)

    path = tmp_path / "ckpt.tf"
    ckpt = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 3,
        "rng": torch.get_rng_state(),
    }
    tensorfile.save(ckpt, path)

    # The original continues.
    expected_losses = _train(model, opt, 4)
    expected_params = [p.detach().clone() for p in model.parameters()]

    # Scramble the RNG, then restore everything into fresh objects.
    torch.manual_seed(999)
    loaded = tensorfile.load(path)
    assert loaded["epoch"] == 3
    assert_same(ckpt["optim"]["param_groups"], loaded["optim"]["param_groups"])
    model2 = _model()
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)  # hyperparameters come from the file
    opt2.load_state_dict(loaded["optim"])
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["amsgrad"] is amsgrad
    torch.set_rng_state(loaded["rng"])
    resumed_losses = _train(model2, opt2, 4)

    assert len(resumed_losses) == len(expected_losses)
    for a, b in zip(resumed_losses, expected_losses):
        assert torch.equal(a, b)
    for a, b in zip(model2.parameters(), expected_params):
        assert torch.equal(a.detach(), b)
    for sa, sb in zip(opt2.state.values(), opt.state.values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name


def test_checkpoint_contents_round_trip(tmp_path, deterministic):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    ckpt = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 3,
        "rng": torch.get_rng_state(),
    }
    snapshot = copy.deepcopy(ckpt)
    tensorfile.save(ckpt, tmp_path / "c.tf")
    loaded = tensorfile.load(tmp_path / "c.tf")
    assert_same(snapshot, loaded)
    assert loaded["rng"].dtype == torch.uint8
    # The Adam step counters are 0-d float tensors, as torch keeps them.
    step = loaded["optim"]["state"][0]["step"]
    assert step.dim() == 0 and step.item() == 2.0
    # The lazily read file names the optimizer state by key path.
    with tensorfile.open(tmp_path / "c.tf") as f:
        assert torch.equal(f.get("optim.state.0.exp_avg"), ckpt["optim"]["state"][0]["exp_avg"])
        assert torch.equal(f.get("rng"), ckpt["rng"])
