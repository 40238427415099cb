"""A training run's checkpoint loop: N durable saves of one training checkpoint, keeping
the last 2, through tensorfile.CheckpointManager(keep_last=2, incremental=False), through
the loop torch users write by hand, and through the raw limit of the same run.

    python bench/manager.py [--size-mib 1024] [--saves 6] [--runs 5] [--dir DIR]

The systems, each a run of --saves saves into a fresh directory:

- manager: `CheckpointManager(d, keep_last=2, incremental=False).save(step, ckpt)` (its
  default durable=True: the file and the commit record fsynced, the directory fsynced
  after the commit and before retention removes the old data);
- torch loop: `torch.save` to `ckpt-STEP.pt.tmp`, fsync it, `os.replace` to `ckpt-STEP.pt`,
  fsync the directory, list `ckpt-*.pt` (the newest name is the latest checkpoint), remove
  all but the last 2, fsync the directory;
- raw: the bytes of the manager's checkpoint file (its size, from one resident 64 MiB
  buffer) written to a fresh file with `posix_fallocate` + `pwrite` + fsync
  (`rawio.write_file`, its fastest thread count and writeback choice on this machine,
  picked once before the runs), the directory fsynced, then all but the last 2 removed
  and the directory fsynced.

Durability is the same for all three: when a save returns, the checkpoint's bytes and its
name are on disk and the removals of the old checkpoints are too. The checkpoint is the
benchmark's `checkpoint` workload ({"model", "optimizer" (Adam state), "epoch", "step",
"rng_state"}) of --size-mib; between saves a training step adds to every tensor in place
(untimed). The systems run interleaved, run by run (their order rotating), in one process;
each save's wall time is a sample. Prints the per-save median over all saves of all runs,
the median of each run's total, and the ratios manager/torch loop and manager/raw."""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import tensorfile
import torch
from tensorfile._files import fsync_dir
from tensorfile.benchmarks import rawio, workloads

KEEP = 2
SYSTEMS = ("manager", "torch loop", "raw")


def _fsync(path: str) -> None:
    rawio.fsync_file(path)


def _prune(d: str, pattern: str) -> list[str]:
    """Lists the checkpoints (named so that they sort by step), removes all but the last
    KEEP and makes the removals durable; returns the kept ones, the latest last."""
    names = sorted(glob.glob(os.path.join(d, pattern)))
    for old in names[:-KEEP]:
        os.remove(old)
    if len(names) > KEEP:
        fsync_dir(d)
    return names[-KEEP:]


class TorchLoop:
    """What users write today around torch.save."""

    def __init__(self, d: str) -> None:
        self.d = d

    def save(self, step: int, obj: Any) -> None:
        final = os.path.join(self.d, f"ckpt-{step:08d}.pt")
        tmp = final + ".tmp"
        torch.save(obj, tmp)
        _fsync(tmp)
        os.replace(tmp, final)
        fsync_dir(self.d)
        self.kept = _prune(self.d, "ckpt-*.pt")

    def latest(self) -> int | None:
        names = sorted(glob.glob(os.path.join(self.d, "ckpt-*.pt")))
        return int(os.path.basename(names[-1])[5:13]) if names else None

    def close(self) -> None:
        pass


class Raw:
    """The same bytes written to a fresh file by the plain system calls, as durable."""

    def __init__(self, d: str, nbytes: int, src: bytes, threads: int, writeback: bool) -> None:
        self.d, self.nbytes, self.src = d, nbytes, src
        self.threads, self.writeback = threads, writeback

    def save(self, step: int, obj: Any) -> None:
        path = os.path.join(self.d, f"raw-{step:08d}.bin")
        rawio.write_file(path, self.nbytes, self.threads, self.src, self.writeback)
        fsync_dir(self.d)
        _prune(self.d, "raw-*.bin")

    def latest(self) -> int | None:
        names = sorted(glob.glob(os.path.join(self.d, "raw-*.bin")))
        return int(os.path.basename(names[-1])[4:12]) if names else None

    def close(self) -> None:
        pass


def _pick_raw(d: str, nbytes: int, src: bytes) -> tuple[int, bool]:
    """The fastest (threads, writeback) of rawio.write_file for this size, tried once each."""
    best: tuple[float, int, bool] | None = None
    for threads in rawio.thread_counts(min(os.cpu_count() or 1, 16)):
        for writeback in (False, True):
            path = os.path.join(d, "probe.bin")
            t0 = time.perf_counter()
            rawio.write_file(path, nbytes, threads, src, writeback)
            fsync_dir(d)
            dt = time.perf_counter() - t0
            os.remove(path)
            if best is None or dt < best[0]:
                best = (dt, threads, writeback)
    assert best is not None
    return best[1], best[2]


def _train_step(obj: Any) -> None:
    for t in workloads.tensors_in(obj):
        if t.is_floating_point():
            t.add_(1e-3)


def _one_run(
    system: str, make: Callable[[str], Any], obj: Any, saves: int, root: str
) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory(dir=root, prefix=system.replace(" ", "-") + ".") as d:
        sink = make(d)
        try:
            for step in range(saves):
                _train_step(obj)
                t0 = time.perf_counter()
                sink.save(step, obj)
                times.append(time.perf_counter() - t0)
            latest = sink.latest()
            files = [n for n in os.listdir(d) if not n.startswith(".")]
        finally:
            sink.close()
        if latest != saves - 1:
            raise RuntimeError(f"{system}: latest is {latest}, expected {saves - 1}")
        data = [n for n in files if n.endswith((".tf", ".pt", ".bin"))]
        if len(data) != min(KEEP, saves):
            raise RuntimeError(f"{system}: left {sorted(files)}, expected {KEEP} checkpoints")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=1024, help="checkpoint size (MiB)")
    ap.add_argument("--saves", type=int, default=6, help="saves per run (a training run)")
    ap.add_argument("--runs", type=int, default=5, help="runs per system, interleaved")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    if args.saves < 1 or args.runs < 1:
        ap.error("--saves and --runs must be at least 1")

    # The checkpoint workload is half its size flag: ask for twice the checkpoint size.
    obj = workloads.build_workload("checkpoint", 2 * args.size_mib, 0)
    payload = sum(t.numel() * t.element_size() for t in workloads.tensors_in(obj))

    root = tempfile.mkdtemp(prefix="tf-bench-manager.", dir=args.dir)
    try:
        probe = os.path.join(root, "probe.tf")
        tensorfile.save(obj, probe, durable=False)
        nbytes = os.path.getsize(probe)
        os.remove(probe)
        src = b"\x01" * min(nbytes, rawio.CHUNK)
        threads, writeback = _pick_raw(root, nbytes, src)

        makers: dict[str, Callable[[str], Any]] = {
            "manager": lambda d: tensorfile.CheckpointManager(d, keep_last=KEEP, incremental=False),
            "torch loop": TorchLoop,
            "raw": lambda d: Raw(d, nbytes, src, threads, writeback),
        }
        got: dict[str, list[list[float]]] = {s: [] for s in SYSTEMS}
        for run in range(args.runs):
            order = SYSTEMS[run % len(SYSTEMS) :] + SYSTEMS[: run % len(SYSTEMS)]
            for system in order:
                got[system].append(_one_run(system, makers[system], obj, args.saves, root))
            print(
                f"run {run + 1}/{args.runs}: "
                + ", ".join(f"{s} {statistics.median(got[s][-1]):.3f} s" for s in SYSTEMS),
                file=sys.stderr,
                flush=True,
            )
    finally:
        rawio.remove(root)

    per_save = {s: statistics.median(x for r in got[s] for x in r) for s in SYSTEMS}
    per_run = {s: statistics.median(sum(r) for r in got[s]) for s in SYSTEMS}
    fs = rawio.filesystem(args.dir or tempfile.gettempdir())
    print(
        f"checkpoint loop: {args.saves} saves of {payload / 2**30:.2f} GiB "
        f"({nbytes / 2**30:.2f} GiB tensorfile file), keep_last={KEEP}, durable (fsync) in "
        f"every system; medians of {args.runs} runs x {args.saves} saves, interleaved"
    )
    print(
        f"on {fs['device']} ({fs['type']}); raw: {threads} thread(s), "
        f"writeback {'on' if writeback else 'off'}"
    )
    print(f"{'system':<12}{'s/save':>9}{'GB/s':>8}{'s/run':>9}{'t/t(manager)':>13}")
    for s in SYSTEMS:
        print(
            f"{s:<12}{per_save[s]:>9.3f}{nbytes / per_save[s] / 1e9:>8.2f}"
            f"{per_run[s]:>9.2f}{per_save[s] / per_save['manager']:>13.2f}"
        )
    print(
        f"manager/torch loop = {per_save['manager'] / per_save['torch loop']:.2f} "
        f"(time per save; < 1 is faster), manager/raw = "
        f"{per_save['manager'] / per_save['raw']:.2f} (1.00 is the limit)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
