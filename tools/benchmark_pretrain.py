"""Pre-training throughput per task set (the paper's Table 1); see eve_ds/bench/cli.py and the README."""

from eve_ds.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
