"""Samples/s of the training input pipeline with 1 and N workers next to a bare decode + crop loop.

    python tools/bench_data.py --shards 'data/synthetic/train/shard-{000000..000007}.tar' --workers 2 \
        --image-size 224 --json benchmarks/results/bench_data-cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from eve_ds.bench.data_pipeline import markdown, run
from eve_ds.data.pipeline import load_corpus
from eve_ds.utils.errors import UserError, cli_main
from eve_ds.utils.io import atomic_write_json

log = logging.getLogger("bench_data")


def earlier_results(path: str) -> list:
    """The results already in the --json file (none when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except ValueError as e:
        raise UserError(f"the --json file is not JSON ({path}: {e}); give a new file or fix it") from None
    if not isinstance(results, list):
        raise UserError(f"the --json file does not hold a list of results ({path}); give a new file")
    return results


@cli_main("eve-bench-data")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(
        prog="eve-bench-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", required=True, help="brace spec of the shards to read")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="the N of the N-worker run")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-batches", type=int, default=20)
    p.add_argument("--json", help="write the results here (a list; appended to if the file exists)")
    args = p.parse_args(argv)
    if args.workers < 0 or min(args.batch_size, args.num_batches) < 1:
        p.error("--workers must be >= 0, --batch-size and --num-batches >= 1")
    load_corpus("bench", args.shards, subset=True)  # a missing or empty spec: one line, before any timing
    results = earlier_results(args.json) if args.json else []
    result = run(
        args.shards,
        args.workers,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
    )
    sys.stdout.write(markdown(result) + "\n")
    if args.json:
        atomic_write_json(args.json, [*results, result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
