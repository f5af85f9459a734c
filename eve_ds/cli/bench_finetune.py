"""`eve-bench-finetune`: a fine-tuning from a pre-trained run next to the same one from scratch, over seeds.

    eve-bench-finetune --config vqa_tiny_synthetic --init runs/eve_tiny_synthetic --seeds 0 1 \
        --json benchmarks/results/vqa-tiny-cpu.json --markdown benchmarks/results/vqa-tiny-cpu.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from eve_ds.repro.init_gain import METRICS, markdown, run_one, summarize
from eve_ds.train.config import load_config
from eve_ds.utils.io import atomic_write_json, atomic_write_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve-bench-finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a fine-tuning config, e.g. vqa_tiny_synthetic")
    p.add_argument("--init", required=True, help="the pre-trained run dir / export to start from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--work-dir", help="where the runs go (default: a temporary directory)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run")
    args = p.parse_args(argv)
    task = load_config(args.config, args.overrides).task.name
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="eve-bench-finetune-"))
    runs: dict[str, list[dict]] = {"pre-trained": [], "scratch": []}
    for seed in args.seeds:
        for name, init in (("pre-trained", args.init), ("scratch", "none")):
            res = run_one(args.config, work / f"{name}-seed{seed}", init, seed, args.overrides)
            runs[name].append(res)
            print(
                f"{name} seed {seed}: "
                + ", ".join(f"{k}={res[k]:.4g}" for k in [*METRICS[task][:1], "seconds"])
            )
    summary = {name: summarize(rs, METRICS[task]) for name, rs in runs.items()}
    command = "eve-bench-finetune " + shlex.join(argv if argv is not None else sys.argv[1:])
    table = markdown(task, summary, command)
    print(table)
    if args.json:
        atomic_write_json(args.json, {"task": task, "config": args.config, "command": command, "runs": runs})
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
