"""GPU benchmark script: tensorfile load to and save from CUDA against torch and safetensors, as fractions of the limits of the same run (see python/tensorfile/benchmarks/gpu.py; bench/gpu_check.sh runs it)."""

import sys

from tensorfile.benchmarks.gpu import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench/gpu_bench.py"))
