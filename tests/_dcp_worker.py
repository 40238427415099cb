"""One rank of the multi-process DCP tests: run(SCENARIO, RANK, WORLD, ROOT), started by
tests/test_dcp.py through a forkserver (or `python _dcp_worker.py SCENARIO RANK WORLD ROOT`).

Each scenario saves or loads DTensor-sharded state dicts over a gloo process group on the
CPU; a value that does not come back exactly raises, and the traceback is written to
ROOT/error-SCENARIO-RANK.txt for the test to report.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Any

import torch

# The shapes are chosen so that 4-rank and 2-rank Shard(0) layouts cut "big" at different
# rows: a 2-rank load then reads part of a saved chunk, and the chunks (3 MiB) are large
# enough to carry per-block checksums.
BIG_ROWS, BIG_COLS = 3001, 1024


def full_state(version: int) -> dict[str, Any]:
    """The unsharded values every scenario saves, derived from `version` alone."""
    g = torch.Generator().manual_seed(version)
    return {
        "model": {
            "w": torch.randn(64, 40, generator=g),
            "v": torch.randn(30, 48, generator=g),
            "r": torch.randn(17, generator=g),
            "big": torch.randn(BIG_ROWS, BIG_COLS, generator=g),
            "ids": torch.arange(100, dtype=torch.int64) * version,
            "mask": torch.arange(9) % (version + 1) == 0,
        },
        "step": 1000 + version,
        "extra": {"name": f"run-{version}", "lr": 0.5 / version, "betas": (0.9, 0.99)},
    }


def sharded_state(mesh: Any, version: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = full_state(version)
    m = full["model"]
    return {
        "model": {
            "w": distribute_tensor(m["w"], mesh, [Shard(0)]),
            "v": distribute_tensor(m["v"], mesh, [Shard(1)]),
            "r": distribute_tensor(m["r"], mesh, [Replicate()]),
            "big": distribute_tensor(m["big"], mesh, [Shard(0)]),
            "ids": m["ids"],  # a plain tensor, the same on every rank
            "mask": m["mask"],
        },
        "step": full["step"],
        "extra": full["extra"],
    }


def empty_like_state(mesh: Any) -> dict[str, Any]:
    """Destinations with the layouts of sharded_state, filled with values that differ."""
    sd = sharded_state(mesh, 99)
    for k, t in sd["model"].items():
        sd["model"][k] = torch.zeros_like(t)
    sd["step"] = -1
    sd["extra"] = {"name": "", "lr": 0.0, "betas": (0.0, 0.0)}
    return sd


def check(loaded: dict[str, Any], version: int, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    want = full_state(version)
    for k, expect in want["model"].items():
        got = loaded["model"][k]
        if isinstance(got, DTensor):
            got = got.full_tensor()
        assert got.dtype == expect.dtype, (k, got.dtype, expect.dtype)
        assert torch.equal(got, expect), f"rank {rank}: model.{k} differs after load"
    assert loaded["step"] == want["step"], (loaded["step"], want["step"])
    assert loaded["extra"] == want["extra"], (loaded["extra"], want["extra"])


def crash_overwrite(path: str, version: int) -> None:
    """Single process, no process group: saves `version` into the checkpoint directory
    `path` and dies (SIGKILL) while its rank file is half written."""
    import tensorfile._files
    import tensorfile.dcp as tdcp

    def die(name: str) -> None:
        if name == "writing":
            os.kill(os.getpid(), signal.SIGKILL)

    tensorfile._files.phase = die  # type: ignore[assignment]
    tdcp.state_dict_to_dcp(full_state(version), path)


def stop_before_commit(path: str, version: int, how: str) -> None:
    """Single process: saves `version` into `path` and stops once its rank file is
    written, before the commit: `die` (SIGKILL), or `wait` (prints "ready", then blocks
    until stdin closes and exits without committing)."""
    import tensorfile.dcp as tdcp
    from tensorfile.dcp import _writer

    def stop(*args: Any, **kwargs: Any) -> None:
        if how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        print("ready", flush=True)
        sys.stdin.read()
        os._exit(0)

    _writer.StorageWriter.finish = stop  # type: ignore[method-assign]
    warnings.simplefilter("ignore")
    tdcp.state_dict_to_dcp(full_state(version), path)


def run(scenario: str, rank: int, world: int, root: str) -> None:
    try:
        _run(scenario, rank, world, root)
    except BaseException:
        with open(os.path.join(root, f"error-{scenario}-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run(scenario: str, rank: int, world: int, root: str) -> None:
    warnings.simplefilter("error")
    import tensorfile._files
    import tensorfile.dcp as tdcp
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/store-{scenario}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=20 if scenario == "kill" else 60),
    )
    mesh = init_device_mesh("cpu", (world,))

    def load(path: str) -> dict[str, Any]:
        dest = empty_like_state(mesh)
        dcp.load(dest, storage_reader=tdcp.StorageReader(path))
        return dest

    if scenario == "save4":
        sd = sharded_state(mesh, 1)
        dcp.save(sd, storage_writer=tdcp.StorageWriter(f"{root}/A"))
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(f"{root}/S", thread_count=2))
        check(load(f"{root}/A"), 1, rank)
        # async: the caller mutates its tensors as soon as async_save returns; the
        # checkpoint must hold the values from the moment of the call.
        sd2 = sharded_state(mesh, 2)
        fut = dcp.async_save(sd2, storage_writer=tdcp.StorageWriter(f"{root}/B"))
        for t in sd2["model"].values():
            local = t.to_local() if hasattr(t, "to_local") else t
            local.fill_(True) if local.dtype == torch.bool else local.add_(1000)
        sd2["step"] = 0
        fut.result()
        check(load(f"{root}/B"), 2, rank)
    elif scenario == "load2" or scenario == "load1":
        check(load(f"{root}/A"), 1, rank)
        check(load(f"{root}/B"), 2, rank)
    elif scenario == "kill":
        if rank == 1:
            # Dies for good while its rank file is half written, before the rename.
            def die(name: str) -> None:
                if name == "writing":
                    os.kill(os.getpid(), signal.SIGKILL)

            tensorfile._files.phase = die  # type: ignore[assignment]
        dcp.save(sharded_state(mesh, 3), storage_writer=tdcp.StorageWriter(f"{root}/C"))
    elif scenario == "s3":
        # An object-store checkpoint: the URL in TENSORFILE_TEST_DCP_URL, the store's
        # configuration in the standard AWS environment.
        url = os.environ["TENSORFILE_TEST_DCP_URL"]
        dcp.save(sharded_state(mesh, 5), storage_writer=tdcp.StorageWriter(url))
        check(load(url), 5, rank)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
