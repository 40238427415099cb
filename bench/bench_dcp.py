"""Two-rank torch.distributed.checkpoint benchmark: tensorfile.dcp against FileSystemWriter/Reader (see python/tensorfile/benchmarks/dcp.py)."""

import sys

from tensorfile.benchmarks.dcp import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench/bench_dcp.py"))
