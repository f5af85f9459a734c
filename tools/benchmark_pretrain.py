"""Pre-training throughput per task set, the paper's Table 1 (same as `eve-bench`; see eve_ds/cli/bench.py)."""

import sys

from eve_ds.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
