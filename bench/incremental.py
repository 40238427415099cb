"""Incremental checkpoints against their targets: the second save of a fine-tuning run whose
state dict is 90% frozen, through CheckpointManager(incremental=True) and
CheckpointManager(incremental=False).

    python bench/incremental.py [--size-mib 1024] [--runs 5] [--dir DIR]

The state dict is the benchmark's Llama-shaped one of --size-mib (float32); its trainable
part is taken from the last layers backwards, as many tensors as fit in 10% of its bytes
(the embedding, the output projection and the other layers are frozen). One trial: a fresh
directory, a manager (keep_last=2, durable=True, its default), save(0), a training step
(an in-place add to the tensors it changes, untimed), then save(1), timed. Two steps:

- "trainable": the step changes only the trainable tensors;
- "all": the step changes every tensor (nothing for an incremental save to share).

The trials run interleaved (step, then system, their order alternating run by run), in
one process. What save(1) wrote is measured two ways: the allocated size (st_blocks * 512)
of the files under the directory that it created or grew (a new name of an existing inode
counts nothing, a grown file its growth), and the process's wchar delta in /proc/self/io
(the bytes its write system calls passed; write_bytes, what reached the block layer, is
printed too). A full save is incremental=False's save(1) of the same step, measured the same
way. Targets, on the medians:

(a) bytes of save(1), "trainable" step, incremental / full <= 0.15 (both measures);
(b) its time, incremental / full <= 0.25;
(c) "all" step: incremental save time / full save time <= 1.1.

Prints PASS or MISS for each with its figures and exits 0 either way. The first run loads
each system's save(1) back (verify=True) and checks it equals the state dict, so that a
save that skips bytes it needed cannot pass."""

from __future__ import annotations

import argparse
import os
import stat
import statistics
import sys
import tempfile
import time

import tensorfile
import torch
from tensorfile.benchmarks import rawio, workloads

TRAINABLE_FRACTION = 0.10
SYSTEMS = ("incremental", "full")
STEPS = ("trainable", "all")


def build_state(size_mib: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict and the names of its trainable tensors."""
    shapes = workloads.transformer_shapes(int(size_mib * (1 << 20)))
    sd = workloads.build(shapes, "float32", seed=0)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    frozen_always = {"tok_embeddings.weight", "output.weight"}
    trainable: list[str] = []
    budget = TRAINABLE_FRACTION * total
    for name, _ in reversed(shapes):
        nb = sd[name].numel() * sd[name].element_size()
        if name not in frozen_always and nb <= budget:
            trainable.append(name)
            budget -= nb
    return sd, trainable


def _proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def _allocated(d: str) -> dict[tuple[int, int], int]:
    """(st_dev, st_ino) -> allocated bytes of every regular file under `d`."""
    out = {}
    for top, _, names in os.walk(d):
        for n in names:
            try:
                st = os.lstat(os.path.join(top, n))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out


def _new_bytes(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> int:
    return sum(max(0, b - before.get(k, 0)) for k, b in after.items())


def _step(sd: dict[str, torch.Tensor], names: list[str]) -> None:
    for n in names:
        sd[n].add_(1e-3)


def trial(
    root: str,
    incremental: bool,
    sd: dict[str, torch.Tensor],
    changed: list[str],
    check: bool,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=root) as d:
        mgr = tensorfile.CheckpointManager(d, keep_last=2, incremental=incremental)
        try:
            mgr.save(0, sd)
            _step(sd, changed)
            before, io0 = _allocated(d), _proc_io()
            t0 = time.perf_counter()
            mgr.save(1, sd)
            dt = time.perf_counter() - t0
            io1, after = _proc_io(), _allocated(d)
            if check:
                back = mgr.load(1, verify=True)
                bad = [k for k in sd if not torch.equal(back[k], sd[k])]
                if sorted(back) != sorted(sd) or bad:
                    raise RuntimeError(
                        f"incremental={incremental}: save(1) does not load back equal "
                        f"({len(bad)} tensors differ: {bad[:3]})"
                    )
                del back
        finally:
            mgr.close()
    return {
        "s": dt,
        "blocks": _new_bytes(before, after),
        "wchar": io1["wchar"] - io0["wchar"],
        "write_bytes": io1["write_bytes"] - io0["write_bytes"],
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=1024, help="state dict size (MiB)")
    ap.add_argument("--runs", type=int, default=5, help="trials per (step, system)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    sd, trainable = build_state(args.size_mib)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    tbytes = sum(sd[n].numel() * sd[n].element_size() for n in trainable)
    changes = {"trainable": trainable, "all": list(sd)}

    got: dict[tuple[str, str], list[dict[str, float]]] = {
        (st, sy): [] for st in STEPS for sy in SYSTEMS
    }
    root = tempfile.mkdtemp(prefix="tf-bench-incremental.", dir=args.dir)
    try:
        for run in range(args.runs):
            for step in STEPS:
                order = SYSTEMS if run % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    got[step, system].append(
                        trial(root, system == "incremental", sd, changes[step], check=run == 0)
                    )
            print(
                f"run {run + 1}/{args.runs}: "
                + ", ".join(f"{st}/{sy} {got[st, sy][-1]['s']:.3f} s" for st, sy in got),
                file=sys.stderr,
                flush=True,
            )
    finally:
        rawio.remove(root)

    med = {
        key: {m: statistics.median(r[m] for r in rows) for m in rows[0]}
        for key, rows in got.items()
    }
    inc, full = med["trainable", "incremental"], med["trainable", "full"]
    inc_all, full_all = med["all", "incremental"], med["all", "full"]
    frac_blocks = inc["blocks"] / full["blocks"] if full["blocks"] else float("nan")
    frac_wchar = inc["wchar"] / full["wchar"] if full["wchar"] else float("nan")
    frac_wb = inc["write_bytes"] / full["write_bytes"] if full["write_bytes"] else float("nan")
    time_ratio = inc["s"] / full["s"]
    all_ratio = inc_all["s"] / full_all["s"]
    fs = rawio.filesystem(args.dir or tempfile.gettempdir())
    mib = 1 << 20

    print(
        f"incremental saves: {total / 2**30:.2f} GiB float32 state dict, {len(sd)} tensors; "
        f"trainable {tbytes / total:.1%} of its bytes ({len(trainable)} tensors); "
        f"keep_last=2, durable; medians of {args.runs} interleaved trials; "
        f"on {fs['device']} ({fs['type']})"
    )
    print(f"{'save(1) after step':<20}{'system':<13}{'s':>8}{'alloc MiB':>11}{'wchar MiB':>11}"
          f"{'write_bytes MiB':>17}")  # fmt: skip
    for (st, sy), m in med.items():
        print(
            f"{st:<20}{sy:<13}{m['s']:>8.3f}{m['blocks'] / mib:>11.1f}{m['wchar'] / mib:>11.1f}"
            f"{m['write_bytes'] / mib:>17.1f}"
        )
    print("targets:")
    print(
        f"  {_verdict(frac_blocks <= 0.15 and frac_wchar <= 0.15)} (a) bytes of the second "
        f"save <= 0.15 of a full save: allocated {frac_blocks:.3f}, wchar {frac_wchar:.3f} "
        f"(write_bytes {frac_wb:.3f})"
    )
    print(
        f"  {_verdict(time_ratio <= 0.25)} (b) time of the second save <= 0.25 of a full "
        f"save: {time_ratio:.3f} ({inc['s']:.3f} s vs {full['s']:.3f} s)"
    )
    print(
        f"  {_verdict(all_ratio <= 1.1)} (c) every tensor changed: incremental / full save "
        f"time <= 1.1: {all_ratio:.3f} ({inc_all['s']:.3f} s vs {full_all['s']:.3f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
