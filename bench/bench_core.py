"""Benchmark script: tensorfile against raw I/O limits, torch.save/torch.load and safetensors (the same as `python -m tensorfile bench`)."""

import sys

from tensorfile.cli import bench

if __name__ == "__main__":
    bench.main(args=sys.argv[1:], prog_name="bench/bench_core.py")
