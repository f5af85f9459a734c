"""What pre-training buys downstream: the same fine-tuning from a pre-trained run and from scratch, over
seeds, as a table and JSON (each fine-tune in its own process, timed end to end)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The metrics worth a column, per task (the first one is the headline).
METRICS = {
    "vqa": ["vqa_score", "vqa_score/yes/no", "vqa_score/number", "vqa_score/other"],
    "retrieval": ["r_mean", "tr_r1", "ir_r1", "itc_r_mean"],
    "nlvr2": ["nlvr2_acc"],
}


def run_one(config: str, run_dir: Path, init: str, seed: int, overrides: list[str]) -> dict:
    """One `eve-finetune` in a fresh process -> its final metrics plus `seconds` (wall clock)."""
    cmd = [sys.executable, "-m", "eve_ds.cli.finetune", "--config", config, "--run-dir", str(run_dir)]
    cmd += [f"train.init_from={init}", f"train.seed={seed}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {**final, "seconds": seconds, "seed": seed, "init": init}


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
    lines = [f"| start | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    for name, summary in rows.items():
        lines.append(f"| {name} | {' | '.join(_cell(summary, k) for k in keys)} |")
    return "\n".join(lines) + f"\n\nMean ± half the spread over seeds. Command: `{command}`\n"


def _cell(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    mean, spread = summary[key]
    return f"{mean:.4g} ± {spread:.2g}"
