"""The chain's report: our numbers next to the paper's (Table 2 for EVE-Base, Table 4 for EVE-Large), each
stage's status, wall and GPU hours, and the pre-training's throughput -> RUN_ROOT/report.json + report.md."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from eve_ds.repro import paper
from eve_ds.repro.chain.plan import Stage, by_name, has_traces, is_complete, plan, read_plan, stage_record
from eve_ds.repro.chain.slurm import read_jobs
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.io import atomic_write_json, atomic_write_text
from eve_ds.utils.markdown import table

RECALLS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
# {"overall": score in percent}, from `eve-report --vqa-test-dev / --vqa-test-std`
EVALAI_FILE = "eval/vqa_test-dev_evalai.json"
EVALAI_STD_FILE = "eval/vqa_test-std_evalai.json"
# The paper's three EVE models, in the report's columns.
PAPER_MODELS: tuple[tuple[str, str], ...] = (("base", "4m"), ("large", "4m"), ("large", "16m"))


@dataclass(frozen=True)
class Row:
    """One number of the report: where ours comes from (a JSON file under the run root, a key, a scale to
    percent) and which paper entry it is compared with."""

    task: str
    metric: str
    split: str
    source: str
    key: str
    scale: float = 1.0
    note: str = ""


ROWS: tuple[Row, ...] = (
    Row("vqa", "vqa_score", "test-dev", EVALAI_FILE, "overall", 1.0, "EvalAI score of the predictions file"),
    Row(
        "vqa",
        "vqa_score",
        "test-std",
        EVALAI_STD_FILE,
        "overall",
        1.0,
        "EvalAI test-std phase: predictions for the whole test split (--split test)",
    ),
    Row("vqa", "vqa_score", "minival", "vqa/final_metrics.json", "vqa_score", 100.0),
    Row("nlvr2", "nlvr2_acc", "dev", "eval/nlvr2_dev.json", "nlvr2_acc", 100.0),
    Row("nlvr2", "nlvr2_acc", "test-P", "eval/nlvr2_test1.json", "nlvr2_acc", 100.0),
    *(Row("retrieval_coco", m, "test", "eval/retrieval_coco_test.json", m) for m in RECALLS),
    *(Row("retrieval_flickr30k", m, "test", "eval/retrieval_flickr30k_test.json", m) for m in RECALLS),
)


# -- timing -------------------------------------------------------------------------------------------

_LAUNCH_TIME = re.compile(r"^\[launch (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\]")


def launch_seconds(run_dir: Path) -> float | None:
    """Wall seconds of a training stage: over the launcher's per-attempt logs (logs/slurm-<job>.<n>.log),
    first to last timestamp of each, summed over requeues. None when it never ran under slurm/launch.sh."""
    total, found = 0.0, False
    for log in sorted((run_dir / "logs").glob("slurm-*.log")):
        stamps = [
            m.group(1)
            for line in log.read_text(errors="replace").splitlines()
            if (m := _LAUNCH_TIME.match(line))
        ]
        if stamps:
            found = True
            total += (datetime.fromisoformat(stamps[-1]) - datetime.fromisoformat(stamps[0])).total_seconds()
    return total if found else None


def stage_seconds(stage: Stage, run_root: Path) -> float | None:
    if stage.kind == "train":
        return launch_seconds(run_root / stage.name)
    return (stage_record(stage, run_root) or {}).get("seconds")


def stage_status(stage: Stage, run_root: Path) -> str:
    """complete | failed (a small stage's job exited non-zero) | incomplete (something on disk: running,
    preempted or failed) | not started."""
    if is_complete(stage, run_root):
        return "complete"
    if (stage_record(stage, run_root) or {}).get("exit_code", 0) != 0:
        return "failed"
    return "incomplete" if has_traces(stage, run_root) else "not started"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(run_root: Path, size: str, corpus: str) -> list[dict]:
    """One row per task, metric and split: ours (percent, None until its stage has run), the paper's for
    this size and corpus (None where the paper gives none, and for the tiny model), the difference, and
    the paper's cell for each of its three models."""
    mine = paper.FINETUNED.get((size, corpus))
    known = mine.values if mine else {}
    out = []
    for r in ROWS:
        data = _read_json(run_root / r.source) or {}
        ours = data.get(r.key)
        ours = round(ours * r.scale, 2) if isinstance(ours, (int, float)) else None
        ref = known.get((r.task, r.metric, r.split))
        row = {
            "task": r.task,
            "metric": r.metric,
            "split": r.split,
            "value": ours,
            "paper": ref,
            "diff": round(ours - ref, 2) if ours is not None and ref is not None else None,
            "paper_models": {
                f"{sz}/{c}": paper.FINETUNED[sz, c].values.get((r.task, r.metric, r.split))
                for sz, c in PAPER_MODELS
            },
        }
        if r.note:
            row["note"] = r.note
        out.append(row)
    return out


def stage_rows(stages: list[Stage], run_root: Path) -> list[dict]:
    jobs = read_jobs(run_root)
    out = []
    for s in stages:
        if s.kind == "report":
            continue
        status = stage_status(s, run_root)
        seconds = stage_seconds(s, run_root)
        hours = None if seconds is None else round(seconds / 3600, 4)
        out.append(
            {
                "name": s.name,
                "status": status,
                "wall_hours": hours,
                "gpus": s.gpus,
                "gpu_hours": None if hours is None else round(hours * s.gpus, 4),
                "job_id": jobs.get(s.name, {}).get("job_id"),
            }
        )
    return out


def pretraining_throughput(run_dir: Path, gpus: int) -> dict | None:
    """Median pairs/s (all ranks) and MFU of the pre-training's logged windows, from its metrics.jsonl;
    the first window (compilation, warm-up) is left out when there are others."""
    recs = [r for r in RunDir(run_dir).records() if "samples_per_s" in r]
    if len(recs) > 1:
        recs = recs[1:]
    if not recs:
        return None
    pairs = statistics.median(r["samples_per_s"] for r in recs)
    mfus = [r["mfu"] for r in recs if isinstance(r.get("mfu"), (int, float))]
    return {
        "pairs_per_s": round(pairs, 2),
        "pairs_per_s_per_gpu": round(pairs / gpus, 2) if gpus else None,
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "steps": recs[-1].get("step"),
    }


def build_report(run_root: Path, size: str | None = None, corpus: str | None = None) -> dict:
    """report.json's content; size and corpus default to the chain's plan.json."""
    run_root = Path(run_root)
    params = (
        read_plan(run_root) if size is None else {"size": size, "corpus": corpus or "4m", "overrides": []}
    )
    stages = plan(params["size"], params["corpus"], params["overrides"])
    paper_row = paper.FINETUNED.get((params["size"], params["corpus"]))
    st = stage_rows(stages, run_root)
    gpu_hours = [s["gpu_hours"] for s in st if s["gpu_hours"] is not None]
    return {
        "size": params["size"],
        "corpus": params["corpus"],
        "run_root": str(run_root),
        "paper_source": paper.FINETUNED_SOURCE,
        "paper_row": paper_row.where if paper_row else None,
        "rows": rows(run_root, params["size"], params["corpus"]),
        "stages": st,
        "gpu_hours": round(sum(gpu_hours), 4) if gpu_hours else None,
        "pretraining": pretraining_throughput(run_root / "pretrain", by_name(stages)["pretrain"].gpus),
    }


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    size, corpus = report["size"], report["corpus"]
    title = (
        "EVE-tiny, synthetic sets" if size == "tiny" else f"EVE-{size.capitalize()}, {corpus.upper()} corpus"
    )
    models = [f"{sz}/{c}" for sz, c in PAPER_MODELS]
    numbers = table(
        ("task", "metric", "split", "ours", "paper", "diff", *(f"paper {m}" for m in models)),
        (
            [r["task"], r["metric"], r["split"], r["value"], r["paper"], r["diff"]]
            + [r["paper_models"][m] for m in models]
            for r in report["rows"]
        ),
        align="lllrrr" + "r" * len(models),
        digits=2,
        none="—",
    )
    stages = table(
        ("stage", "status", "wall h", "GPUs", "GPU h", "job"),
        (
            [s["name"], s["status"], s["wall_hours"], s["gpus"], s["gpu_hours"], s["job_id"]]
            for s in report["stages"]
        ),
        align="llrrrl",
        digits=3,
        none="—",
    )
    paper_row = report.get("paper_row") or "none (no paper counterpart)"
    lines = [f"# Table 2 reproduction: {title}", "", f"Run root: `{report['run_root']}`", "", numbers]
    lines += ["", stages, "", f"GPU hours, all stages so far: {_fmt(report['gpu_hours'], 3)}."]
    pre = report["pretraining"]
    if pre:
        lines.append(
            f"Pre-training: {_fmt(pre['pairs_per_s'])} pairs/s ({_fmt(pre['pairs_per_s_per_gpu'])} per GPU), "
            f"MFU {_fmt(pre['mfu'], 3)} (median over the logged windows)."
        )
    lines += [
        "",
        f"Percent throughout. Paper: {report['paper_source']}; `paper` is {paper_row}. — where the paper "
        "gives no number (it reports no EVE R@5 / R@10 and no minival) and for the tiny model (no paper "
        "counterpart). VQA test-dev and test-std are scored by EvalAI: submit the predictions, then "
        "`eve-report RUN_ROOT --vqa-test-dev SCORE --vqa-test-std SCORE`.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_root: Path, size: str | None = None, corpus: str | None = None) -> dict:
    report = build_report(run_root, size, corpus)
    atomic_write_text(Path(run_root) / "report.md", markdown(report))
    atomic_write_json(Path(run_root) / "report.json", report)  # last: the report stage's completion mark
    return report
