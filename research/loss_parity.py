"""Losses of a short deterministic run of every packaged tiny config, for comparing two versions of the code.

    python -m research.loss_parity --out research/results/loss-parity-after.json
    python -m research.loss_parity --compare research/results/loss-parity-before.json \
        research/results/loss-parity-after.json

Each config trains `--steps` steps from scratch with `train.deterministic=true` (deterministic kernels, one
CPU thread) in its own run directory under `--work-dir`, logging every step; the result is every logged
scalar of every step. Two results are equal when every value matches exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = ("eve_tiny_synthetic", "vqa_tiny_synthetic", "retrieval_tiny_synthetic", "nlvr2_tiny_synthetic")


def run(config: str, run_dir: Path, cache_dir: Path, steps: int) -> list[dict]:
    """Train `config` for `steps` steps in a fresh process -> its metrics.jsonl training records."""
    overrides = [
        f"train.max_steps={steps}",
        "train.deterministic=true",
        "train.log_every=1",
        f"train.checkpoint_every={steps}",
        f"train.eval_every={10 * steps}",
        "train.init_from=none",
        f"data.cache_dir={cache_dir}",
    ]
    cmd = [sys.executable, "-m", "eve_ds.cli.pretrain", "--config", config, "--run-dir", str(run_dir)]
    subprocess.run([*cmd, *overrides], check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("loss", "_loss", "_acc", "lr", "grad_norm")
    return [{k: v for k, v in r.items() if k == "step" or k.endswith(keep)} for r in records if "loss" in r]


# Logged keys renamed since a result may have been recorded: old name -> new name. Losses are named after
# their objective (`mim_pixel` logs `mim_pixel_loss`, formerly `mim_loss`); the values are the same.
RENAMED = {"mim_loss": "mim_pixel_loss"}


def renamed(records: list[dict]) -> list[dict]:
    return [{RENAMED.get(k, k): v for k, v in r.items()} for r in records]


def compare(a: dict, b: dict) -> list[str]:
    """Every (config, step, key) whose value differs between two results (keys in `RENAMED` are compared
    under their new names)."""
    diffs = []
    for config in sorted(set(a) | set(b)):
        ra, rb = renamed(a.get(config, [])), renamed(b.get(config, []))
        if len(ra) != len(rb):
            diffs.append(f"{config}: {len(ra)} vs {len(rb)} records")
        for x, y in zip(ra, rb):
            for k in sorted(set(x) | set(y)):
                u, v = x.get(k), y.get(k)
                same = u == v or (
                    isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v)
                )
                if not same:
                    diffs.append(f"{config} step {x.get('step')}: {k} {u!r} vs {v!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the result JSON here")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument(
        "--work-dir", type=Path, default=None, help="run and cache directories (default: a temp dir)"
    )
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        diffs = compare(*(json.loads(f.read_text())["runs"] for f in args.compare))
        print("\n".join(diffs[:50]) if diffs else "identical: every logged value of every step matches")
        return 1 if diffs else 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="eve-parity-"))
    runs = {c: run(c, work / c, work / "cache", args.steps) for c in args.configs}
    result = {
        "steps": args.steps,
        "command": " ".join(["python -m research.loss_parity", *sys.argv[1:]]),
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
