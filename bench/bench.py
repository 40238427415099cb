"""Benchmark script: tensorfile against the raw I/O limits and its peers, the same run as `python -m tensorfile bench` (see bench/README.md)."""

import sys

from tensorfile.benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench/bench.py"))
