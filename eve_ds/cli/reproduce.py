"""`eve-report` and `eve-reproduce`: the Table 2 reproduction's report, and the chain of Slurm jobs behind
slurm/reproduce.sh.

eve-report RUN_ROOT                          # RUN_ROOT/report.md + report.json, from whatever has run
eve-report RUN_ROOT --vqa-test-dev 77.9      # record the EvalAI test-dev score of the predictions file
eve-report RUN_ROOT --vqa-test-std 78.0      # and the test-std score (predictions for the whole test split)
eve-reproduce --size tiny --run-root DIR --wait [STAGE:]KEY=VALUE ...
python -m eve_ds.cli.reproduce run-stage RUN_ROOT STAGE   # inside a stage's job (export, evaluate, report)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from eve_ds.repro.chain import plan as chain_plan
from eve_ds.repro.chain import report, slurm
from eve_ds.utils.io import atomic_write_json

logger = logging.getLogger("eve_ds.repro.chain")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_root", help="the --run-root of slurm/reproduce.sh (a partial chain works too)")
    p.add_argument(
        "--size", choices=chain_plan.SIZES, help="default: the chain's (RUN_ROOT/reproduce/plan.json)"
    )
    p.add_argument("--corpus", choices=chain_plan.CORPORA, default=None)
    p.add_argument("--vqa-test-dev", type=float, help="the EvalAI test-dev score (percent) to record")
    p.add_argument("--vqa-test-std", type=float, help="the EvalAI test-std score (percent) to record")
    p.add_argument("--json", action="store_true", help="print report.json instead of the markdown")
    args = p.parse_args(argv)
    root = Path(args.run_root).resolve()
    if args.vqa_test_dev is not None:
        atomic_write_json(root / report.EVALAI_FILE, {"overall": args.vqa_test_dev})
    if args.vqa_test_std is not None:
        atomic_write_json(root / report.EVALAI_STD_FILE, {"overall": args.vqa_test_std})
    try:
        result = report.write_report(root, args.size, args.corpus)
    except (FileNotFoundError, chain_plan.PlanError) as e:
        print(f"eve-report: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else report.markdown(result))
    return 0


def parse_reproduce(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="slurm/reproduce.sh",
        description="Submit the whole Table 2 chain with Slurm dependencies; rerun to resume.",
    )
    p.add_argument("--size", required=True, choices=chain_plan.SIZES)
    p.add_argument("--corpus", default="4m", choices=chain_plan.CORPORA)
    p.add_argument("--run-root", required=True, help="every stage's output goes under it")
    p.add_argument("--wait", action="store_true", help="block until the chain ends; exit 1 if a stage failed")
    p.add_argument("--dry-run", action="store_true", help="preflight and print the actions; submit nothing")
    p.add_argument("--poll", type=float, default=5.0, help="--wait: seconds between squeue calls")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[STAGE:]KEY=VALUE",
        help="config overrides: every training stage, or one (pretrain, retrieval_coco, vqa, nlvr2, "
        "retrieval_flickr; finetune: the four fine-tunes)",
    )
    return p.parse_args(argv)


@contextlib.contextmanager
def chain_output() -> Iterator[None]:
    """The chain's log lines on stdout as `reproduce: ...` (what a user watches and the tests read)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("reproduce: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def reproduce_main(argv: list[str] | None = None) -> int:
    args = parse_reproduce(argv)
    with chain_output():
        return slurm.run_chain(
            (args.size, args.corpus, args.overrides),
            Path(args.run_root).resolve(),
            until_done=args.wait,
            dry_run=args.dry_run,
            poll=args.poll,
        )


def run_stage_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve_ds.cli.reproduce run-stage")
    p.add_argument("run_root")
    p.add_argument("stage")
    args = p.parse_args(argv)
    from eve_ds.repro.chain.stages import run_planned_stage
    from eve_ds.train.metrics import setup_logging

    setup_logging(0)
    return run_planned_stage(Path(args.run_root).resolve(), args.stage)


COMMANDS = {"reproduce": reproduce_main, "run-stage": run_stage_main}

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = COMMANDS.get(argv[0]) if argv else None
    sys.exit(command(argv[1:]) if command else main(argv))
