"""Lightning's CheckpointIO over tensorfile: Trainer checkpoints saved and loaded without pickle.

Usage::

    import pytorch_lightning as pl  # or lightning.pytorch
    import tensorfile.lightning

    trainer = pl.Trainer(plugins=[tensorfile.lightning.CheckpointIO()])
    # or, writing in a background thread:
    from pytorch_lightning.plugins.io import AsyncCheckpointIO
    trainer = pl.Trainer(plugins=[AsyncCheckpointIO(tensorfile.lightning.CheckpointIO())])

`import tensorfile` never imports Lightning; `import tensorfile.lightning` needs
pytorch-lightning or lightning installed.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from . import _config, api

_BASES: list[type] = []
try:  # pytorch-lightning's Trainer checks plugins against lightning_fabric's class
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as _FabricCheckpointIO

    _BASES.append(_FabricCheckpointIO)
except ImportError:
    pass
try:  # the unified `lightning` package carries its own copy of the class
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO

    _BASES.append(_LightningCheckpointIO)
except ImportError:
    pass
if not _BASES:
    raise ImportError(
        "tensorfile.lightning needs Lightning: pip install pytorch-lightning (or lightning)"
    )


def _local(path: Any, what: str) -> str:
    name = os.fspath(path)
    if "://" in name:
        raise ValueError(
            f"tensorfile.lightning.CheckpointIO.{what}: {name} is a URL; only local paths are "
            "supported"
        )
    return name


class CheckpointIO(*_BASES):  # type: ignore[misc]
    """A Lightning CheckpointIO plugin that writes each checkpoint as a tensorfile.

    `save_checkpoint` writes atomically (a temporary file renamed over the target;
    fsynced unless `durable=False`), creating the parent directory. A Lightning
    checkpoint's plain values (epoch, loop and callback states, hyper-parameters,
    optimizer and scheduler states) are stored as tensorfile stores them; anything it
    cannot represent (an OmegaConf container, a Path, a custom class in the
    hyper-parameters) raises TypeError naming its key path, and nothing is written:
    nothing is ever pickled. `load_checkpoint` reads tensorfile files (and, since
    tensorfile.load reads them too, torch.save and safetensors files), never running
    code from them; `weights_only` is accepted and changes nothing. `map_location=None`
    loads onto the CPU, as Lightning's TorchCheckpointIO does; other values are those
    of tensorfile.load. `remove_checkpoint` removes a file, or a directory tree.
    Works under Lightning's AsyncCheckpointIO, which calls save_checkpoint from its
    thread with cloned tensors."""

    def __init__(self, *, durable: bool = True, num_threads: int | None = None) -> None:
        super().__init__()
        if num_threads is not None:
            _config.num_threads(num_threads)  # validates
        self.durable = durable
        self.num_threads = num_threads

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "tensorfile.lightning.CheckpointIO.save_checkpoint: storage_options is not "
                "supported (pass durable= and num_threads= to CheckpointIO instead)"
            )
        name = _local(path, "save_checkpoint")
        parent = os.path.dirname(os.path.abspath(name))
        os.makedirs(parent, exist_ok=True)
        api.save(checkpoint, name, durable=self.durable, num_threads=self.num_threads)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        name = _local(path, "load_checkpoint")
        if not os.path.exists(name):
            raise FileNotFoundError(2, f"Checkpoint file not found: {name}", name)
        out = api.load(
            name,
            "cpu" if map_location is None else map_location,
            num_threads=self.num_threads,
        )
        if not isinstance(out, dict):
            raise TypeError(
                f"tensorfile.lightning.CheckpointIO.load_checkpoint: {name} holds a "
                f"{type(out).__name__}, not a checkpoint dict"
            )
        return out

    def remove_checkpoint(self, path: Any) -> None:
        name = _local(path, "remove_checkpoint")
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name)
        else:
            os.unlink(name)


__all__ = ["CheckpointIO"]
