"""Pre-training throughput per task set, the paper's Table 1 (same as `eve-bench`; see eve_ds/cli/benchmark_pretrain.py)."""

import sys

from eve_ds.cli.benchmark_pretrain import main

if __name__ == "__main__":
    sys.exit(main())
