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

log = logging.getLogger("bench_data")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="brace spec of the shards to read")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="the N of the N-worker run")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-batches", type=int, default=20)
    p.add_argument("--json", help="write the results here (a list; appended to if the file exists)")
    args = p.parse_args(argv)
    result = run(
        args.shards,
        args.workers,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
    )
    sys.stdout.write(markdown(result) + "\n")
    if args.json:
        results = []
        if os.path.exists(args.json):
            with open(args.json, encoding="utf-8") as f:
                results = json.load(f)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([*results, result], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
