"""`eve-pretrain` / `python -m eve_ds.train`: pre-train EVE.

eve-pretrain                                   # tiny model, synthetic corpus, CPU: a first run
eve-pretrain --config eve_base_4m --run-dir runs/base optim.lr=4e-4 model.ep_size=8
torchrun --nproc_per_node 2 -m eve_ds.train model.ep_size=2
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from eve_ds.train.config import ConfigError, load_config

logger = logging.getLogger("eve_ds.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-pretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--config",
        default="eve_tiny_synthetic",
        help="packaged config name (eve_tiny_synthetic, eve_base_4m, eve_large_4m, eve_large_16m) "
        "or a YAML path",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default: runs/<config name>); an existing "
        "one is resumed from its latest checkpoint",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"eve-pretrain: config error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    from eve_ds.train.trainer import NonFiniteLossError, Trainer

    try:
        return Trainer(cfg, run_dir).train()
    except ConfigError as e:
        print(f"eve-pretrain: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
