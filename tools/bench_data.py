"""Samples/s of the training input pipeline with 1 and N workers next to a bare decode + crop loop (same as `eve-bench-data`; see eve_ds/cli/bench_data.py)."""

import sys

from eve_ds.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
