"""Child processes of tests/test_manager.py.

`python _manager_worker.py loop DIR FIRST COUNT DIE_AT DELAY LOG` saves steps FIRST ..
FIRST+COUNT-1 through a CheckpointManager (keep_last=2, numpy payloads, so no torch is
imported) and appends every phase the saves reach to LOG ("begin N" before each step).
At the DIE_AT-th phase of the last save (counted from 1; 0: never) it SIGKILLs itself,
DELAY seconds later from a timer thread if DELAY > 0, so the kill can land anywhere
between two phases.

`python _manager_worker.py hold DIR` opens a manager on DIR, prints "ready" and holds it
until its stdin closes.

`run_dcp(SCENARIO, RANK, WORLD, ROOT)` is one gloo rank of the format="dcp" tests, started
through a forkserver as tests/test_dcp.py starts tests/_dcp_worker.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any

import numpy as np

KEEP_LAST = 2
NUMEL = 1 << 20  # 8 MiB of float64: the data write takes a while to land kills in
FROZEN = 1 << 16


def payload(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "w": np.full(NUMEL, float(step)),
        # the same for two steps in a row: incremental saves refer to the older file's
        "frozen": np.full(FROZEN, float(step // 2)),
        "small": [np.full(i + 1, step, dtype=np.int32) for i in range(8)],
    }


def check_payload(obj: Any, step: int) -> None:
    assert obj["step"] == step, (obj["step"], step)
    assert obj["w"].shape == (NUMEL,) and bool((obj["w"] == float(step)).all()), step
    assert bool((obj["frozen"] == float(step // 2)).all()), step
    for i, a in enumerate(obj["small"]):
        assert a.shape == (i + 1,) and bool((a == step).all()), (step, i)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def loop(directory: str, first: int, count: int, die_at: int, delay: float, log: str) -> None:
    import tensorfile
    import tensorfile._files
    import tensorfile._io

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    last = first + count - 1
    seen = 0
    step = first

    def phase(name: str) -> None:
        nonlocal seen
        os.write(fd, name.encode() + b"\n")
        seen += step == last
        if step == last and seen == die_at:
            if delay > 0:
                threading.Timer(delay, _kill_self).start()
            else:
                _kill_self()

    tensorfile._files.phase = phase  # type: ignore[assignment]
    tensorfile._io.phase = phase  # type: ignore[attr-defined]
    mgr = tensorfile.CheckpointManager(directory, keep_last=KEEP_LAST)
    for step in range(first, first + count):
        os.write(fd, f"begin {step}\n".encode())
        mgr.save(step, payload(step), metrics={"loss": 1.0 / (step + 1)})
    mgr.close()
    if delay > 0:
        time.sleep(delay + 1)  # a timer still pending kills the process here


def hold(directory: str) -> None:
    import tensorfile

    with tensorfile.CheckpointManager(directory):
        print("ready", flush=True)
        sys.stdin.read()


# --------------------------------------------------------------------------- DCP ranks


def damage_rank_file(directory: str, rank: int) -> None:
    """Flips one byte in the first storage of `rank`'s file in a DCP checkpoint directory."""
    from tensorfile._reader import open_reader

    (name,) = [n for n in os.listdir(directory) if n.startswith(f"__{rank}_")]
    path = os.path.join(directory, name)
    with open_reader(path) as r:
        at = int(r.layout.storage_offsets[0])
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def run_dcp(scenario: str, rank: int, world: int, root: str) -> None:
    try:
        _run_dcp(scenario, rank, world, root)
    except BaseException:
        with open(os.path.join(root, f"error-{scenario}-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_dcp(scenario: str, rank: int, world: int, root: str) -> None:
    warnings.simplefilter("error")
    import _dcp_worker as w
    import tensorfile
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/store-{scenario}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    mesh = init_device_mesh("cpu", (world,))
    run = os.path.join(root, "run")
    if scenario == "retain":
        mgr = tensorfile.CheckpointManager(run, format="dcp", keep_last=2, keep_every=2)
        for v in (1, 2, 3, 4, 5):
            mgr.save(v, w.sharded_state(mesh, v), metrics={"loss": 1.0 / v})
            dist.barrier()
        # Retention ran on rank 0 before save returned on every rank.
        assert mgr.steps() == [2, 4, 5], mgr.steps()
        assert mgr.metrics(5) == {"loss": 0.2}, mgr.metrics(5)
        w.check(mgr.load(into=w.empty_like_state(mesh)), 5, rank)
        w.check(mgr.load(2, into=w.empty_like_state(mesh)), 2, rank)
        if rank == 0:
            damage_rank_file(mgr.path(5), 1)
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w.check(mgr.load(into=w.empty_like_state(mesh)), 4, rank)
        messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(messages) == 1 and "step 5" in messages[0], messages
        assert "checksum" in messages[0], messages
        if rank == 1:
            # Rank 0 holds the directory's lock: another writing manager is refused.
            try:
                tensorfile.CheckpointManager(run)
            except BlockingIOError:
                pass
            else:
                raise AssertionError("rank 1 could open a second manager on rank 0's directory")
        dist.barrier()
        mgr.delete(5)  # rank 0 removes it; the other ranks return
        dist.barrier()
        assert mgr.steps() == [2, 4] and mgr.latest() == 4, mgr.steps()
        mgr.close()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop(
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            int(sys.argv[5]),
            float(sys.argv[6]),
            sys.argv[7],
        )
    elif sys.argv[1] == "hold":
        hold(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
