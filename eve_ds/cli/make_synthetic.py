"""Generate the synthetic shapes corpus (train/ and val/ shards with manifests), deterministic by seed.

python tools/make_synthetic.py --output data/synthetic --num-train 20000 --num-val 1000 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import sys

from eve_ds.data.synthetic import make_synthetic_corpus
from eve_ds.data.writer import summary
from eve_ds.utils.errors import cli_main

log = logging.getLogger("make_synthetic")


@cli_main("eve-make-synthetic")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(
        prog="eve-make-synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True)
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--num-val", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if min(args.num_train, args.num_val, args.samples_per_shard) < 1 or args.image_size < 32:
        p.error("--num-train, --num-val, --samples-per-shard must be >= 1 and --image-size >= 32")
    manifests = make_synthetic_corpus(
        args.output,
        args.num_train,
        args.num_val,
        args.seed,
        args.image_size,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
    )
    for split, manifest in manifests.items():
        log.info("%s/%s: %s", args.output, split, summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
