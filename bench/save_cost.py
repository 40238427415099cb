"""Times tensorfile.save in one process for one case, to compare two builds of the engine
run in turn (e.g. before and after a change to the write path):

    python bench/save_cost.py big          # 1 GiB in 16 float32 tensors, durable=False
    python bench/save_cost.py big-durable  # the same, durable=True (fsync)
    python bench/save_cost.py small        # 20,000 small float32 tensors, durable=False

Prints one JSON line: the case, every repetition's wall seconds and CPU seconds (all
threads of the process, the kernel's work included) and their medians; on a shared
machine the CPU seconds vary less than the wall seconds. Point
PYTHONPATH at the tree whose engine you want, and alternate the two trees' runs (A B A
B ...) so that the machine's drift hits both alike; compare the medians' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import tensorfile
import torch

CASES = {
    "big": (False, "big"),
    "big-durable": (True, "big"),
    "small": (False, "small"),
}


def payload(kind: str) -> dict[str, torch.Tensor]:
    if kind == "big":
        return {f"layer{i}.weight": torch.full((16 << 20,), float(i)) for i in range(16)}
    sizes = np.random.default_rng(0).integers(16, 4097, 20_000)
    return {f"layer{i}.w": torch.full((int(n),), float(i)) for i, n in enumerate(sizes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--reps", type=int, default=3, help="timed saves (after one untimed)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    durable, kind = CASES[args.case]
    obj = payload(kind)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "ckpt.tf")
        times, cpu = [], []
        for rep in range(args.reps + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            tensorfile.save(obj, path, durable=durable)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            os.unlink(path)
            if rep:
                times.append(dt)
                cpu.append(dc)
    print(
        json.dumps(
            {
                "case": args.case,
                "engine": os.path.dirname(tensorfile.__file__),
                "seconds": [round(t, 4) for t in times],
                "median_s": round(statistics.median(times), 4),
                "cpu_seconds": [round(t, 4) for t in cpu],
                "cpu_median_s": round(statistics.median(cpu), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
