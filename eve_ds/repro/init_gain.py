"""What pre-training buys downstream: the same fine-tuning from a pre-trained run and from scratch, over
seeds, as a table and JSON (each fine-tune in its own process, timed end to end)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from eve_ds.train.launch import run_training
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.markdown import table

# The metrics worth a column, per task (the first one is the headline).
METRICS = {
    "vqa": ["vqa_score", "vqa_score/yes/no", "vqa_score/number", "vqa_score/other"],
    "retrieval": ["r_mean", "tr_r1", "ir_r1", "itc_r_mean"],
    "nlvr2": ["nlvr2_acc"],
}


def run_one(config: str, run_dir: Path, init: str, seed: int, overrides: list[str]) -> dict:
    """One fine-tune in a fresh process (its output in RUN_DIR.log) -> its final metrics plus `seconds`
    (wall clock, process start-up included)."""
    start = time.perf_counter()
    run_training(config, run_dir, [f"train.init_from={init}", f"train.seed={seed}", *overrides])
    seconds = time.perf_counter() - start
    return {**RunDir(run_dir).final_metrics(), "seconds": seconds, "seed": seed, "init": init}


def summarize(runs: list[dict], keys: list[str]) -> dict:
    """{key: (mean, half the spread)} over the runs that report the key."""
    out = {}
    for k in [*keys, "seconds"]:
        values = [r[k] for r in runs if k in r]
        if values:
            out[k] = (statistics.fmean(values), (max(values) - min(values)) / 2)
    return out


def markdown(task: str, rows: dict[str, dict], command: str) -> str:
    keys = [k for k in [*METRICS.get(task, []), "seconds"] if any(k in r for r in rows.values())]
    body = ([name, *(_cell(summary, k) for k in keys)] for name, summary in rows.items())
    text = table(["start", *keys], body, align="l" * (len(keys) + 1))
    return text + f"\n\nMean ± half the spread over seeds. Command: `{command}`\n"


def _cell(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    mean, spread = summary[key]
    return f"{mean:.4g} ± {spread:.2g}"
