"""`eve-pretrain` / `python -m eve_ds.cli.pretrain`: pre-train EVE.

eve-pretrain                                   # tiny model, synthetic corpus, CPU: a first run
eve-pretrain --config eve_base_4m --run-dir runs/base optim.lr=4e-4 model.ep_size=8
eve-pretrain --config eve_base_4m --dry-run --json --world-size 16     # preflight, no training
torchrun --nproc_per_node 2 -m eve_ds.cli.pretrain model.ep_size=2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from eve_ds.train import EXIT_INTERRUPTED
from eve_ds.train.config import load_config, packaged_configs
from eve_ds.utils.errors import cli_main

logger = logging.getLogger("eve_ds.train")


def parse_args(
    argv: list[str] | None, prog: str = "eve-pretrain", default_config: str = "eve_tiny_synthetic"
) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--config",
        default=default_config,
        help=f"packaged config name ({', '.join(packaged_configs())}) or a YAML path (default: {default_config})",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default: runs/<config name>); an existing "
        "one is resumed from its latest checkpoint",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, corpora, shards, init checkpoint and layout without training; "
        "exit 0 when the run would start, 2 with every problem listed",
    )
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --dry-run: the world size to check (default: WORLD_SIZE, SLURM_NTASKS or 1)",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="resuming: apply changed learning-rate schedule, step count and cadence keys from the "
        "checkpoint's step on (recorded in RUN_DIR/config_changes.json); other changed keys are refused",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    args.prog = prog
    return args


def dry_run(cfg, args: argparse.Namespace) -> int:
    from eve_ds.train.preflight import format_report, preflight, world_size_from_env

    report = preflight(cfg, args.world_size or world_size_from_env())
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 2 if report["problems"] else 0


@cli_main("eve-pretrain")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train (pre-training or a downstream task: the `task:` section decides) or --dry-run. User errors
    (config, data, checkpoints) propagate as UserError: the command's wrapper prints them in one line."""
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg, args)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    from eve_ds.train.stages import train_run
    from eve_ds.train.trainer import NonFiniteLossError

    try:
        return train_run(cfg, run_dir, allow_changes=args.allow_changes)
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return 3
    except KeyboardInterrupt:  # before the loop (set-up) or a second Ctrl-C: nothing saved
        print(f"{args.prog}: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
