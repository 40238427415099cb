"""In-place resume: time and peak RSS of loading a state dict into the tensors that will
use it, against the page-cache read into touched memory (the limit) and the usual
`load_state_dict(load(...))` / `load_state_dict(torch.load(...))`.

    python bench/inplace.py [--size-mb 1024] [--runs 5] [--dir DIR]

Every measure runs in a fresh child process (so peak RSS is its own), the systems
interleaved, the file hot in the page cache; medians are printed with ratios."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time
import numpy as np
import torch
import tensorfile
from tensorfile.benchmarks import rawio, workloads

kind, path, size_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
shapes = workloads.transformer_shapes(int(size_mb * (1 << 20)))
model = workloads.build(shapes, "float32", seed=1)  # the destination: touched memory
for t in model.values():
    t.add_(0)
rawio.warm(path)


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # KiB


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    return status("VmRSS")


base = reset_peak()
t0 = time.perf_counter()
if kind == "raw":
    dst = np.empty(os.path.getsize(path), dtype=np.uint8)
    dst.fill(1)
    base = reset_peak()
    t0 = time.perf_counter()
    rawio.read_file(path, dst, 2)
elif kind == "into":
    tensorfile.load(path, into=model)
elif kind == "load+copy":
    sd = tensorfile.load(path)
    for k, v in sd.items():
        model[k].copy_(v)
elif kind == "torch.load+copy":
    sd = torch.load(path.replace(".tf", ".pt"), weights_only=True)
    for k, v in sd.items():
        model[k].copy_(v)
dt = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"s": dt, "rss_over_base_mib": (peak - base) / 1024}))
"""

SYSTEMS = ("raw", "into", "load+copy", "torch.load+copy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    import tensorfile
    import torch
    from tensorfile.benchmarks import workloads

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "sd.tf")
        shapes = workloads.transformer_shapes(int(args.size_mb * (1 << 20)))
        sd = workloads.build(shapes, "float32", seed=0)
        tensorfile.save(sd, path, durable=False)
        torch.save(sd, path.replace(".tf", ".pt"))
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        del sd
        got: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
        for _ in range(args.runs):
            for system in SYSTEMS:
                p = subprocess.run(
                    [sys.executable, "-c", CHILD, system, path, str(args.size_mb)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got[system].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {s: statistics.median(r["s"] for r in got[s]) for s in SYSTEMS}
    rss = {s: statistics.median(r["rss_over_base_mib"] for r in got[s]) for s in SYSTEMS}
    print(f"in-place load of {nbytes / 2**30:.2f} GiB, hot, medians of {args.runs}")
    print(f"{'system':<18}{'GB/s':>8}{'vs raw':>9}{'vs into':>9}{'peak RSS +MiB':>15}")
    for s in SYSTEMS:
        print(
            f"{s:<18}{nbytes / med[s] / 1e9:>8.2f}{med['raw'] / med[s]:>9.2f}"
            f"{med['into'] / med[s]:>9.2f}{rss[s]:>15.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
