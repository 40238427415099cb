"""Two-rank torch.distributed.checkpoint benchmark: tensorfile.dcp against FileSystemWriter/Reader (see python/tensorfile/_bench_dcp.py)."""

import sys

from tensorfile._bench_dcp import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench/bench_dcp.py"))
