"""tensorfile.lightning.CheckpointIO under a real Lightning Trainer on the CPU: fit with
ModelCheckpoint, resume with ckpt_path= and get the uninterrupted run's steps bit for
bit; under AsyncCheckpointIO too; values tensorfile cannot store are refused by key path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")
import tensorfile  # noqa: E402
import tensorfile.lightning  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.plugins.io import AsyncCheckpointIO  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning_fabric.utilities.warnings.PossibleUserWarning"),
    # A resume writes into the directory it resumes from.
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    # Lightning 2.6's own pytree helper, on torch 2.13.
    pytest.mark.filterwarnings(
        "ignore:.isinstance.treespec, LeafSpec.. is deprecated:FutureWarning"
    ),
]


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": sched}


class Record(Callback):
    """The loss of every training step, by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    return DataLoader(
        TensorDataset(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)),
        batch_size=4,
    )


def _fit(
    root: Path, max_epochs: int, plugin: Any, seed: int, ckpt_path: str | None = None
) -> tuple[Any, Any, Record]:
    pl.seed_everything(seed, verbose=False)
    model = Tiny()
    record = Record()
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=2, monitor="train_loss")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        plugins=[plugin],
        callbacks=[ckpt, record],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return model, trainer, record


def _optimizer_bytes(trainer: Any) -> list[bytes]:
    state = trainer.optimizers[0].state_dict()["state"]
    return [v.numpy().tobytes() for s in state.values() for v in s.values()]


@pytest.mark.parametrize("wrap", ["plain", "async"])
def test_fit_then_resume_matches_an_uninterrupted_run_bit_for_bit(
    tmp_path: Path, wrap: str
) -> None:
    def plugin() -> Any:
        io = tensorfile.lightning.CheckpointIO(durable=False)
        return io if wrap == "plain" else AsyncCheckpointIO(io)

    ref_model, ref_trainer, ref = _fit(tmp_path / "ref", 4, plugin(), seed=0)

    _, trainer, first = _fit(tmp_path / "run", 2, plugin(), seed=0)
    io = trainer.strategy.checkpoint_io
    assert isinstance(
        io if wrap == "plain" else io.checkpoint_io, tensorfile.lightning.CheckpointIO
    )
    last = tmp_path / "run" / "last.ckpt"
    with tensorfile.open(last) as f:
        assert f.format == "tensorfile"  # a tensorfile, not a pickle, whatever the name
    # save_top_k=2: ModelCheckpoint removed the worse ones through remove_checkpoint.
    assert len([p for p in os.listdir(tmp_path / "run") if p != "last.ckpt"]) == 2

    # A fresh process would start from other weights: seed 1, then resume from last.ckpt.
    model, trainer, resumed = _fit(tmp_path / "run", 4, plugin(), seed=1, ckpt_path=str(last))
    assert sorted(first.losses) == [1, 2, 3, 4, 5, 6]
    assert sorted(resumed.losses) == [7, 8, 9, 10, 11, 12]
    for step, loss in resumed.losses.items():
        assert loss == ref.losses[step], step  # exact, not approximate
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
    assert _optimizer_bytes(trainer) == _optimizer_bytes(ref_trainer)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == (
        ref_trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    )


def test_a_lightning_checkpoint_round_trips_with_its_plain_values(tmp_path: Path) -> None:
    io = tensorfile.lightning.CheckpointIO()
    ckpt = {
        "epoch": 3,
        "global_step": 30,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": torch.nn.Linear(2, 2).state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'loss'}": {
                "best_model_score": torch.tensor(0.5),
                "dirpath": "/x",
            }
        },
        "hyper_parameters": {"lr": 0.1, "betas": (0.9, 0.99), "name": None},
    }
    path = tmp_path / "sub" / "epoch=3.ckpt"
    io.save_checkpoint(ckpt, path)
    back = io.load_checkpoint(path, weights_only=True)
    assert back["loops"] == ckpt["loops"] and back["hyper_parameters"] == ckpt["hyper_parameters"]
    assert type(back["state_dict"]) is type(ckpt["state_dict"])
    assert all(torch.equal(back["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    cb = back["callbacks"]["ModelCheckpoint{'monitor': 'loss'}"]
    assert cb["dirpath"] == "/x" and float(cb["best_model_score"]) == 0.5
    io.remove_checkpoint(path)
    assert not path.exists()
    io.remove_checkpoint(path)  # already gone: nothing to do
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        io.load_checkpoint(path)


def test_what_tensorfile_cannot_store_is_refused_by_key_path(tmp_path: Path) -> None:
    io = tensorfile.lightning.CheckpointIO()
    path = tmp_path / "bad.ckpt"
    ckpt = {"epoch": 1, "hyper_parameters": {"data_dir": Path("/data"), "lr": 0.1}}
    with pytest.raises(TypeError, match=r"hyper_parameters\.data_dir"):
        io.save_checkpoint(ckpt, path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"epoch": 1}, path, storage_options={"x": 1})


def test_a_trainer_reports_the_key_path_of_a_value_it_cannot_save(tmp_path: Path) -> None:
    class Odd(Tiny):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["extra"] = {"sampler": object()}

    trainer = pl.Trainer(
        max_epochs=1,
        plugins=[tensorfile.lightning.CheckpointIO(durable=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    with pytest.raises(TypeError, match=r"extra\.sampler"):
        trainer.fit(Odd(), _data())
