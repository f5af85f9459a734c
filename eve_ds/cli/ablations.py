"""`eve-ablations`: the paper's pre-training ablations (Tables 5 and 6) on CPU: each task set pre-trained
for the same wall-clock budget, then fine-tuned on synthetic VQA, NLVR2 and retrieval over seeds.

    eve-ablations                                  # the default: ~1 hour on 2 cores, writes
                                                   # benchmarks/results/ablations-cpu.{md,json}
    eve-ablations --quick --out /tmp/abl           # a few steps of everything (tests)
    eve-ablations --budget-s 300 --seeds 0 1 2 --work-dir runs/abl300 --out /tmp/abl300
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from eve_ds.repro.ablations.runner import run_ablation
from eve_ds.repro.ablations.spec import FINETUNES, TASK_SETS, AblationConfig, quick_config
from eve_ds.repro.ablations.summary import markdown
from eve_ds.utils.io import atomic_write_json, atomic_write_text
from eve_ds.utils.task_sets import format_task_sets, parse_task_sets

RESULTS = Path("benchmarks/results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-ablations",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="a few steps per run, tiny sets, one seed")
    p.add_argument(
        "--work-dir", type=Path, help="runs go here (default: runs/ablations, or OUT/runs with --quick)"
    )
    p.add_argument("--out", type=Path, help=f"where ablations-cpu.{{md,json}} go (default: {RESULTS})")
    p.add_argument("--budget-s", type=float, help="pre-training loop seconds per task set")
    p.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds")
    p.add_argument("--pretrain-seed", type=int)
    p.add_argument(
        "--finetune-steps",
        nargs="+",
        metavar="TASK=N",
        help=f"fine-tuning steps per task ({', '.join(FINETUNES)})",
    )
    p.add_argument(
        "--task-sets",
        nargs="+",
        metavar="A,B|none",
        help=f"pre-training task sets (default: {format_task_sets([t for _, t in TASK_SETS])})",
    )
    p.add_argument("--jobs", type=int, help="fine-tunes at a time, one thread each (default 2)")
    p.add_argument("--cache-dir", help="data.cache_dir of every run (default: the configs')")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> AblationConfig:
    if args.quick and args.out is None:
        raise SystemExit("--quick needs --out DIR (its numbers must not replace the committed results)")
    work = args.work_dir or (args.out / "runs" if args.quick else Path("runs/ablations"))
    cfg = quick_config(work) if args.quick else AblationConfig(work_dir=work)
    for name in ("budget_s", "seeds", "pretrain_seed", "cache_dir", "jobs"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.task_sets:
        cfg.task_sets = parse_task_sets(args.task_sets)
    for item in args.finetune_steps or []:
        task, _, n = item.partition("=")
        if task not in FINETUNES or not n.isdigit() or int(n) < 1:
            raise SystemExit(
                f"--finetune-steps {item!r}: expected TASK=N with TASK in {list(FINETUNES)}, N >= 1"
            )
        cfg.finetune_steps[task] = int(n)
    cfg.pretrain_overrides += args.pretrain_override
    cfg.finetune_overrides += args.finetune_override
    if cfg.budget_s <= 0:
        raise SystemExit(f"--budget-s {cfg.budget_s}: expected > 0")
    if cfg.jobs < 1:
        raise SystemExit(f"--jobs {cfg.jobs}: expected >= 1")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    if not logging.getLogger().handlers:  # the runs' progress; leave a caller's (or pytest's) logging alone
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "eve-ablations " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = run_ablation(cfg, command, quick=args.quick)
    text = markdown(result)
    print(text)
    out = args.out or RESULTS
    atomic_write_text(out / "ablations-cpu.md", text)
    atomic_write_json(out / "ablations-cpu.json", result)
    print(f"wrote {out / 'ablations-cpu.md'} and {out / 'ablations-cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
