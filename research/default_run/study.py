"""The default run's study (research/default_run/README.md, "Experiments"): every configuration tried, as
`eve-pretrain` runs, collected into one table and JSON.

    python -m research.default_run.study --out-dir study --json study.json --md study.md   # all rows
    python -m research.default_run.study --out-dir study --only C1 I                       # some rows
    python -m research.default_run.study --out-dir study --collect-only --json study.json   # just collect

Each row runs `eve-pretrain --run-dir OUT_DIR/ROW` with its overrides, `OMP_NUM_THREADS=--threads` (1: the
study ran two rows side by side on 2 cores); a row whose run directory already holds `final_metrics.json`
is only collected. Rows A-I start from the previous default (std 0.02, learned positions, 2,000 steps);
J-M from the current one. The conv-stem rows run `research/default_run/conv_stem.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eve_ds.train.launch import run_training
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.markdown import table

DEFAULT_CONFIG = "eve_tiny_synthetic"  # what eve-pretrain runs with no --config
PREVIOUS = [
    "model.init_std=0.02",
    "model.pos_embed=learned",
    "train.max_steps=2000",
    "train.eval_every=500",
    "train.checkpoint_every=500",
]
CONV = "conv stem"
# (row, base, overrides); base "previous" prepends PREVIOUS.
ROWS = [
    ("previous default", "previous", []),
    ("A", "previous", ["model.pos_embed=sincos"]),
    ("B", "previous", ["model.pos_embed=sincos", "model.patch_size=8"]),
    ("C1", "previous", ["model.init_std=0.05"]),
    ("C2", "previous", ["model.init_std=0.088"]),
    ("D", "previous", ["model.init_std=0.05", "optim.lr=2e-3"]),
    ("E", "previous", ["model.init_std=0.05", "model.num_heads=8"]),
    ("F", "previous", ["model.init_std=0.05", "train.global_batch_size=16", "train.micro_batch_size=16",
                       "train.max_steps=4000", "optim.warmup_steps=200", "train.eval_every=1000",
                       "train.checkpoint_every=1000"]),
    ("G", "previous", ["model.init_std=0.05", "model.num_layers=6"]),
    ("H", "previous", ["model.init_std=0.05", CONV]),
    ("I", "previous", ["model.init_std=0.05", "model.pos_embed=sincos"]),
    ("current default", "current", []),
    ("J", "current", [CONV]),
    ("K", "current", ["optim.lr=7e-4"]),
    ("L", "current", ["train.seed=1"]),
    ("M", "current", ["train.max_steps=6600", "train.eval_every=1100", "train.checkpoint_every=1100"]),
]  # fmt: skip
CATEGORIES = ["colour", "size", "shape", "relation"]


def command(base: str, overrides: list[str], run_dir: Path) -> list[str]:
    conv = CONV in overrides
    args = (PREVIOUS if base == "previous" else []) + [o for o in overrides if o != CONV]
    script = ["-m", "research.default_run.conv_stem" if conv else "eve_ds.cli.pretrain"]
    return [sys.executable, *script, "--run-dir", str(run_dir), *args]


def collect(run_dir: Path) -> dict | None:
    """Validation rows of a run's metrics.jsonl (per category, with the control) and its median pairs/s."""
    run = RunDir(run_dir)
    if not run.metrics_path.exists():
        return None
    evals, rates = [], []
    for r in run.records():
        if "val/attr_word_acc" in r:
            e = {
                "step": r["step"],
                "attr_word_acc": round(r["val/attr_word_acc"], 3),
                "attr_word_acc_shuffled_images": round(r["val/attr_word_acc_shuffled_images"], 3),
            }
            for c in CATEGORIES:
                e[c] = round(r[f"val/attr_word_acc/{c}"], 3)
                e[f"{c}_shuffled"] = round(r[f"val/attr_word_acc_shuffled_images/{c}"], 3)
            evals.append(e)
        elif "samples_per_s" in r:
            rates.append(r["samples_per_s"])
    rates.sort()
    return {"evals": evals, "pairs_per_s_median": round(rates[len(rates) // 2], 1) if rates else None}


def markdown(rows: list[dict]) -> str:
    header = ["row", "overrides", "step", "attribute words", *CATEGORIES, "pairs/s"]
    lines = []
    for r in rows:
        if not r.get("evals"):
            continue
        e = r["evals"][-1]
        cells = [f"{e[c]:.2f} ({e[c + '_shuffled']:.2f})" for c in CATEGORIES]
        overrides = ", ".join(f"`{o}`" if o != CONV else "conv stem" for o in r["overrides"]) or "—"
        words = f"{e['attr_word_acc']:.3f} ({e['attr_word_acc_shuffled_images']:.3f})"
        lines.append([r["row"], overrides, f"{e['step']:,}", words, *cells, str(r["pairs_per_s_median"])])
    return table(header, lines, align="llrrrrrrr") + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--only", nargs="*", default=None, help="row names (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args()
    out = Path(args.out_dir)
    rows = []
    for name, base, overrides in ROWS:
        if args.only is not None and name not in args.only:
            continue
        run_dir = out / name.replace(" ", "_")
        cmd = command(base, overrides, run_dir)
        if not args.collect_only and not RunDir(run_dir).is_finished():
            print("+", " ".join(cmd), flush=True)
            module = cmd[2]  # the trainer, or the conv-stem variant of it
            run_training(DEFAULT_CONFIG, run_dir, cmd[5:], threads=args.threads, module=module)
        result = collect(run_dir) or {}
        rows.append(
            {"row": name, "base": base, "overrides": overrides, "command": " ".join(cmd[1:]), **result}
        )
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
