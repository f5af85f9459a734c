"""The paper's pre-training ablations (EVE Tables 5 and 6) at small scale: `eve_tiny` pre-trained on the
synthetic corpus with each task set for the same wall-clock budget, then fine-tuned on synthetic VQA, NLVR2
and retrieval over seeds, next to the same fine-tunes from scratch.

    calibrate: a short probe run per task set -> its steps/s (the first logged window, start-up, apart)
    pretrain:  train.max_steps = what fits in the budget at that rate (a full schedule ending on time);
               the loop seconds actually spent are read back from metrics.jsonl
    finetune:  every (task set, task, seed), `train.init_from=<pre-training run>` or `none`
    report:    rows (mean and sample std over the fine-tuning seeds) -> markdown + JSON

Every run is a fresh process of the project's trainer (`eve-pretrain --config ...`; --quick: in this
process), under one work dir keyed by the budget and step counts, and is reused when its final_metrics.json
exists; an unfinished one is deleted and redone (a resumed pre-training would not spend its budget in one
piece).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eve_ds.utils.io import atomic_write_json

PRETRAIN_CONFIG = "eve_tiny_synthetic"

# -- what runs ---------------------------------------------------------------------------------------------

# (label, objectives); [] is the no-pre-training baseline. The last set is the Table-1 benchmark's
# "+ITC +ITM" row (eve_ds/bench/table1.py), the one Table 6 compares with MSM.
TASK_SETS: list[tuple[str, list[str]]] = [
    ("MLM + MIM (EVE)", ["mlm", "mim_pixel"]),
    ("MLM", ["mlm"]),
    ("MIM", ["mim_pixel"]),
    ("MLM + MIM, joint masking †", ["msm_joint"]),
    ("MLM + ITC + ITM + MIM", ["mlm", "itc", "itm", "mim_pixel"]),
    ("no pre-training", []),
]
TABLE5 = (("mlm", "mim_pixel"), ("mlm",), ("mim_pixel",), ("msm_joint",))
TABLE6 = (("mlm", "mim_pixel"), ("mlm", "itc", "itm", "mim_pixel"))

# task -> (packaged config, headline metric, its scale to percent)
FINETUNES: dict[str, tuple[str, str, float]] = {
    "vqa": ("vqa_tiny_synthetic", "vqa_score", 100.0),
    "nlvr2": ("nlvr2_tiny_synthetic", "nlvr2_acc", 100.0),
    "retrieval": ("retrieval_tiny_synthetic", "r_mean", 1.0),
}
# More numbers worth keeping per row (not in the printed table).
EXTRA_METRICS = {"retrieval": ["tr_r1", "ir_r1", "itc_r_mean"], "vqa": [], "nlvr2": []}

# The paper's numbers (EVE-Base, 4M corpus), percent. The tables could not be read from here: the only
# number known is the one issue 13 quotes; every other cell is None ("not found"), never guessed.
PAPER_SOURCE = (
    "EVE (Chen et al., AAAI 2024, arXiv:2308.11971) Tables 5 and 6. Only MIM's NLVR2 (57, as quoted in "
    "issue 13; split not stated) was found here; the other cells are not found (null)."
)
PAPER: dict[tuple[str, ...], dict[str, float | None]] = {
    ("mlm", "mim_pixel"): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mlm",): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mim_pixel",): {"vqa_score": None, "nlvr2_acc": 57.0, "r_mean": None},
    ("msm_joint",): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mlm", "itc", "itm", "mim_pixel"): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
}
# The orderings the paper reports (issue 13): each a chain, best first.
CLAIMS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("Table 5: MLM + MIM > MLM > joint † > MIM", [*TABLE5[:2], TABLE5[3], TABLE5[2]]),
    ("Table 6: MLM + MIM > MLM + ITC + ITM + MIM at equal compute", list(TABLE6)),
]

# Measured on this project's 2-core CPU with OMP_NUM_THREADS=1 (docs/ablations.md): seconds per
# fine-tuning step, and a process's fixed cost (start-up, data, final evaluation) -- for the printed plan.
FINETUNE_COST_S: dict[str, tuple[float, float]] = {
    "vqa": (0.21, 14.0),
    "nlvr2": (0.39, 13.0),
    "retrieval": (1.1, 28.0),  # its evaluation (ITC over all pairs + ITM re-ranking) is ~20 s of that
}
# Steady steps/s of each task set's pre-training, same machine and threads (the plan's reference).
REFERENCE_RATES: dict[tuple[str, ...], float] = {
    ("mlm", "mim_pixel"): 1.98,
    ("mlm",): 2.75,
    ("mim_pixel",): 4.2,
    ("msm_joint",): 2.3,
    ("mlm", "itc", "itm", "mim_pixel"): 0.85,
}
PRETRAIN_FIXED_S = 20.0  # start-up, final validation and checkpoint of one pre-training run
PROBE_FIXED_S = 12.0


@dataclass
class AblationConfig:
    work_dir: Path = Path("runs/ablations")
    budget_s: float = 180.0  # pre-training loop seconds per task set
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # fine-tuning seeds
    pretrain_seed: int = 0
    # Sized for ~1 h on 2 cores (docs/ablations.md). Measured on this CPU: from ~200 steps of MSM, VQA at 150
    # steps already separates from scratch (0.467 vs 0.440); retrieval at 50 steps and NLVR2 at 150 did not
    # (chance), and NLVR2 stayed near chance for ~1000 steps even from the default 2000-step run.
    finetune_steps: dict[str, int] = field(
        default_factory=lambda: {"vqa": 300, "nlvr2": 800, "retrieval": 120}
    )
    # Fine-tunes run `jobs` at a time, each with one intra-op thread (on 2 cores, two one-thread processes
    # get more done than one two-thread process). Pre-training runs one at a time, with all threads.
    jobs: int = 2
    probe_steps: int = 30
    probe_log_every: int = 5
    task_sets: list[list[str]] = field(default_factory=lambda: [ts for _, ts in TASK_SETS])
    pretrain_overrides: list[str] = field(default_factory=list)  # before the tool's own
    finetune_overrides: list[str] = field(default_factory=list)
    task_overrides: dict[str, list[str]] = field(default_factory=dict)  # task -> its fine-tunes' own
    cache_dir: str | None = None  # data.cache_dir of every run; None: the configs' default
    in_process: bool = False  # run the trainer in this process (--quick: no interpreter start-up per run)


QUICK_SMALL = ["train.global_batch_size=8", "train.micro_batch_size=8", "data.num_workers=0"]
QUICK_PRETRAIN = [
    *QUICK_SMALL,
    "data.synthetic_num_train=256",
    "data.synthetic_num_val=64",
    "train.eval_batches=1",
]
QUICK_FINETUNE = {
    "vqa": ["task.synthetic_num_train=40", "task.synthetic_num_val=20", "task.synthetic_num_test=10",
            "task.minival_images=10"],
    "nlvr2": ["task.synthetic_num_train=64", "task.synthetic_num_val=32", "task.synthetic_num_test=32"],
    "retrieval": ["task.synthetic_num_train=40", "task.synthetic_num_val=20", "task.synthetic_num_test=10"],
}  # fmt: skip


def quick_config(work_dir: Path) -> AblationConfig:
    """A few steps of everything on tiny generated sets, one seed: the pipeline end to end in ~a minute."""
    return AblationConfig(
        work_dir=work_dir,
        budget_s=2.0,
        seeds=[0],
        finetune_steps={"vqa": 2, "nlvr2": 2, "retrieval": 2},
        probe_steps=4,
        probe_log_every=1,
        pretrain_overrides=QUICK_PRETRAIN,
        finetune_overrides=QUICK_SMALL,
        task_overrides=QUICK_FINETUNE,
        cache_dir=str(work_dir / "cache"),
        in_process=True,
    )


def label(task_set: list[str]) -> str:
    return next((name for name, ts in TASK_SETS if ts == list(task_set)), " + ".join(task_set) or "none")


def slug(task_set: list[str]) -> str:
    return "+".join(task_set) or "none"


# -- pre-training at a wall-clock budget ---------------------------------------------------------------


def loop_windows(run_dir: Path) -> list[tuple[int, float]]:
    """[(steps, seconds)] of each logged window of a run's training loop, from metrics.jsonl: a record at
    step s with `samples_per_s` covers the steps since the previous record."""
    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch_size"]
    out, prev = [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "samples_per_s" in rec:
            steps = rec["step"] - prev
            out.append((steps, steps * batch / rec["samples_per_s"]))
            prev = rec["step"]
    return out


def rate_from_windows(windows: list[tuple[int, float]]) -> tuple[float, float]:
    """-> (steps/s in the steady state, extra seconds of the first window over that rate: data-loader
    start-up and first-step costs that a budgeted run pays once)."""
    if len(windows) < 2:
        raise ValueError(f"need >= 2 logged windows to calibrate, got {len(windows)}")
    steady = windows[1:]
    rate = sum(n for n, _ in steady) / sum(s for _, s in steady)
    first_n, first_s = windows[0]
    return rate, max(0.0, first_s - first_n / rate)


def budget_steps(budget_s: float, rate: float, startup_s: float) -> int:
    """Steps that fill `budget_s` loop seconds at `rate` steps/s after `startup_s`; at least 1."""
    return max(1, math.floor((budget_s - startup_s) * rate))


def _pretrain_overrides(task_set: list[str], steps: int, cfg: AblationConfig, extra: list[str]) -> list[str]:
    own = [
        f"objective.objectives=[{','.join(task_set)}]",
        f"train.max_steps={steps}",
        f"train.seed={cfg.pretrain_seed}",
        "optim.warmup_ratio=0.05",  # the default run's 100 of 2000 steps, for every step count
        "train.eval_every=1000000000",  # no validation inside the budget
        "train.checkpoint_every=1000000000",  # one checkpoint, at the end
        *([f"data.cache_dir={cfg.cache_dir}"] if cfg.cache_dir else []),
    ]
    return [*cfg.pretrain_overrides, *own, *extra]


def train(
    config: str, run_dir: Path, overrides: list[str], in_process: bool = False, threads: int | None = None
) -> None:
    """One run of the project's trainer (`eve-pretrain --config CONFIG`; fine-tuning configs included): a
    fresh process, its output in RUN_DIR.log next to the run, or (in_process) this process."""
    if in_process:
        from eve_ds.train.config import load_config
        from eve_ds.train.trainer import Trainer

        rc = Trainer(load_config(config, overrides), run_dir).train()
        if rc != 0:
            raise RuntimeError(f"training {config} in {run_dir} ({overrides}) exited with {rc}")
        return
    cmd = [sys.executable, "-m", "eve_ds.cli.pretrain", "--config", config, "--run-dir", str(run_dir)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log_path, "w") as log:
        proc = subprocess.run([*cmd, *overrides], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join([*cmd, *overrides])} failed ({proc.returncode}):\n{tail}")


def _finished(run_dir: Path) -> bool:
    """True when `run_dir` has finished (reuse it); otherwise clear what an interrupted run left."""
    if (run_dir / "final_metrics.json").exists():
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def calibrate(task_set: list[str], cfg: AblationConfig) -> dict:
    """A probe of `probe_steps` steps -> {"steps_per_s", "startup_s"} (kept in calibration.json)."""
    pre_dir = _pretrain_dir(task_set, cfg)
    path = pre_dir / "calibration.json"
    if path.exists():
        return json.loads(path.read_text())
    probe = pre_dir / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    print(f"run: probe {label(task_set)}, {cfg.probe_steps} steps", flush=True)
    extra = [f"train.log_every={cfg.probe_log_every}", "train.eval_batches=1"]
    train(PRETRAIN_CONFIG, probe, _pretrain_overrides(task_set, cfg.probe_steps, cfg, extra), cfg.in_process)
    rate, startup = rate_from_windows(loop_windows(probe))
    result = {"steps_per_s": rate, "startup_s": startup, "probe_steps": cfg.probe_steps}
    atomic_write_json(path, result)
    shutil.rmtree(probe)  # its checkpoint is not needed
    return result


def pretrain(task_set: list[str], cal: dict, cfg: AblationConfig) -> dict:
    """Pre-train for the budget at the calibrated rate -> the row's pre-training fields and the run dir."""
    run_dir = _pretrain_dir(task_set, cfg) / "run"
    steps = budget_steps(cfg.budget_s, cal["steps_per_s"], cal["startup_s"])
    if not _finished(run_dir):
        print(f"run: pre-training {label(task_set)}, {steps} steps", flush=True)
        train(PRETRAIN_CONFIG, run_dir, _pretrain_overrides(task_set, steps, cfg, []), cfg.in_process)
    windows = loop_windows(run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {
        "run_dir": str(run_dir),
        "pretrain_seconds": round(sum(s for _, s in windows), 2),
        "pretrain_steps": final["step"],
        "pretrain_steps_per_s": round(cal["steps_per_s"], 3),
        "pretrain_final": {k: v for k, v in final.items() if not k.startswith("train_") and "/" not in k},
    }


def _pretrain_dir(task_set: list[str], cfg: AblationConfig) -> Path:
    return cfg.work_dir / "pretrain" / f"budget{cfg.budget_s:g}s" / slug(task_set)


# -- fine-tuning -------------------------------------------------------------------------------------------


def finetune(task: str, init: str, ft_root: Path, seed: int, cfg: AblationConfig) -> dict:
    """One fine-tune (reused when finished) -> its final metrics."""
    config, _, _ = FINETUNES[task]
    steps = cfg.finetune_steps[task]
    run_dir = ft_root / f"{task}-{steps}steps-seed{seed}"
    if _finished(run_dir):
        return json.loads((run_dir / "final_metrics.json").read_text())
    overrides = [
        *cfg.finetune_overrides,
        *cfg.task_overrides.get(task, []),
        f"train.max_steps={steps}",
        f"train.init_from={init}",
        f"train.seed={seed}",
        *([f"data.cache_dir={cfg.cache_dir}"] if cfg.cache_dir else []),
    ]
    print(f"run: fine-tuning {task} from {init}, seed {seed}", flush=True)
    train(config, run_dir, overrides, cfg.in_process, threads=1 if cfg.jobs > 1 else None)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~90 MB each, and only the metrics count
    return json.loads((run_dir / "final_metrics.json").read_text())


def finetune_all(inits: list[tuple[list[str], str]], cfg: AblationConfig) -> list[dict[str, list[float]]]:
    """For every (task set, init): {metric: [value per seed]} over every task and fine-tuning seed.
    Runs `cfg.jobs` fine-tunes at a time (in-process runs: one at a time)."""
    jobs = []
    for task_set, init in inits:
        budget = "" if not task_set else f"budget{cfg.budget_s:g}s/"
        ft_root = cfg.work_dir / "finetune" / f"{budget}{slug(task_set)}"
        # Tasks inner: the first two jobs (run together) are different tasks, so two processes never
        # generate the same synthetic data set into the cache at once.
        jobs += [(task_set, task, seed, init, ft_root) for seed in cfg.seeds for task in FINETUNES]

    def run(job):
        task_set, task, seed, init, ft_root = job
        res = finetune(task, init, ft_root, seed, cfg)
        metric = FINETUNES[task][1]
        print(f"  {label(task_set)} / {task} seed {seed}: {metric}={res[metric]:.4g}", flush=True)
        return res

    if cfg.in_process or cfg.jobs <= 1:  # the trainer installs signal handlers: main thread only
        results = [run(job) for job in jobs]
    else:
        with ThreadPoolExecutor(cfg.jobs) as pool:
            results = list(pool.map(run, jobs))
    out: list[dict[str, list[float]]] = [{} for _ in inits]
    index = {id(ts): i for i, (ts, _) in enumerate(inits)}
    for (task_set, task, _, _, _), res in zip(jobs, results):
        per_seed = out[index[id(task_set)]]
        for k in [FINETUNES[task][1], *EXTRA_METRICS[task]]:
            if k in res:
                per_seed.setdefault(k, []).append(res[k])
    return out


# -- aggregation and the table ----------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation of one value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def make_row(task_set: list[str], pre: dict | None, per_seed: dict[str, list[float]]) -> dict:
    row: dict = {"task_set": list(task_set), "label": label(task_set)}
    row.update(
        pre or {"run_dir": None, "pretrain_seconds": 0.0, "pretrain_steps": 0, "pretrain_steps_per_s": None}
    )
    for k, values in per_seed.items():
        row[k], row[f"{k}_std"] = mean_std(values)
    row["per_seed"] = per_seed
    row["paper"] = PAPER.get(tuple(task_set))
    return row


def claim_checks(rows: list[dict]) -> list[dict]:
    """For each paper ordering and headline metric: does ours (by mean) follow it, and is every gap of the
    chain wider than the spreads (`resolved`; None with one seed: no spread)?"""
    by_set = {tuple(r["task_set"]): r for r in rows}
    out = []
    for name, chain in CLAIMS:
        if not all(ts in by_set for ts in chain):
            continue
        for _, metric, _ in FINETUNES.values():
            rows_ = [by_set[ts] for ts in chain]
            if any(r.get(metric) is None for r in rows_):
                continue
            pairs = list(itertools.pairwise(rows_))
            out.append(
                {
                    "claim": name,
                    "metric": metric,
                    "values": [r[metric] for r in rows_],
                    "holds": all(a[metric] > b[metric] for a, b in pairs),
                    "resolved": _resolved(pairs, metric),
                }
            )
    return out


def _resolved(pairs: list[tuple[dict, dict]], metric: str) -> bool | None:
    """Every gap of the chain wider than the larger standard deviation of its two rows; None when a row
    has a single seed."""
    if any(len(r["per_seed"][metric]) < 2 for pair in pairs for r in pair):
        return None
    return all(abs(a[metric] - b[metric]) > max(a[f"{metric}_std"], b[f"{metric}_std"]) for a, b in pairs)


def _cell(row: dict, metric: str, scale: float) -> str:
    if row.get(metric) is None:
        return "—"
    return f"{row[metric] * scale:.1f} ± {row[f'{metric}_std'] * scale:.1f}"


def _paper(row: dict, metric: str) -> str:
    v = (row.get("paper") or {}).get(metric)
    return "—" if v is None else f"{v:g}"


def table(rows: list[dict], task_sets: tuple[tuple[str, ...], ...] | None) -> list[str]:
    """Markdown rows for the task sets in `task_sets` (None: all) plus the no-pre-training row."""
    heads = [m for _, m, _ in FINETUNES.values()]
    lines = [
        "| pre-training tasks | steps | loop s | "
        + " | ".join(heads)
        + " | "
        + " | ".join(f"paper {h}" for h in heads)
        + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(heads)),
    ]
    for r in rows:
        if task_sets is not None and r["task_set"] and tuple(r["task_set"]) not in task_sets:
            continue
        cells = [_cell(r, m, s) for _, m, s in FINETUNES.values()]
        paper = [_paper(r, m) for _, m, _ in FINETUNES.values()]
        lines.append(
            f"| {r['label']} | {r['pretrain_steps']} | {r['pretrain_seconds']:.0f} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(paper)
            + " |"
        )
    return lines


def markdown(result: dict) -> str:
    rows = result["rows"]
    steps = ", ".join(f"{t} {n}" for t, n in result["finetune_steps"].items())
    lines = [
        "# Pre-training ablations (EVE Tables 5 and 6), eve_tiny on the synthetic sets",
        "",
        f"Pre-training budget: {result['budget_s']:g} s of training loop per task set (seed "
        f"{result['pretrain_seed']}); fine-tuning: {steps} steps, seeds {result['seeds']}.",
        "",
        "## Table 5: which signals to mask",
        "",
        *table(rows, TABLE5),
        "",
        "## Table 6: masked signal modeling vs + ITC + ITM, same pre-training wall clock",
        "",
        *table(rows, TABLE6),
        "",
        "## The paper's orderings here",
        "",
    ]
    for c in result["claims"]:
        vals = " vs ".join(f"{v:.4g}" for v in c["values"])
        verdict = "holds" if c["holds"] else "does not hold"
        note = {None: " (one seed: no spread)", False: " (within the spread)", True: ""}[c["resolved"]]
        lines.append(f"- {c['claim']}, {c['metric']}: {vals} -> {verdict}{note}")
    lines += [
        "",
        "Mean ± sample standard deviation over the fine-tuning seeds (each pre-training ran once: the spread "
        "leaves out pre-training's own variance). VQA score and NLVR2 accuracy in percent, r_mean = mean of "
        "the six recalls (percent). `steps` / `loop s`: pre-training steps reached and the seconds its "
        "training loop took (from metrics.jsonl, start-up and final validation excluded). "
        f"Paper: {result['paper_source']}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


# -- the whole ablation ------------------------------------------------------------------------------------


def plan_minutes(cfg: AblationConfig, slowdown: float = 1.0) -> dict[str, float]:
    """Expected minutes per phase from the per-run costs measured on this project's 2-core CPU
    (FINETUNE_COST_S), fine-tuning scaled by `slowdown` (this machine's step time / the reference's)."""
    n_pre = sum(1 for ts in cfg.task_sets if ts)
    ft = sum(cfg.finetune_steps[t] * per + fixed for t, (per, fixed) in FINETUNE_COST_S.items())
    return {
        "calibration": n_pre * (PROBE_FIXED_S + cfg.probe_steps / 2.0) / 60,
        "pretraining": n_pre * (cfg.budget_s + PRETRAIN_FIXED_S) / 60,
        "finetuning": len(cfg.task_sets) * len(cfg.seeds) * ft * slowdown / 60 / max(1, cfg.jobs),
    }


def slowdown(calibration: dict[tuple[str, ...], dict]) -> float:
    """Median over the calibrated task sets of the reference steps/s (REFERENCE_RATES) / this machine's."""
    ratios = [
        REFERENCE_RATES[ts] / c["steps_per_s"] for ts, c in calibration.items() if ts in REFERENCE_RATES
    ]
    return statistics.median(ratios) if ratios else 1.0


def print_plan(cfg: AblationConfig) -> None:
    mins = plan_minutes(cfg)
    n_ft = len(cfg.task_sets) * len(cfg.seeds) * len(FINETUNES)
    print(
        f"ablation plan: {len(cfg.task_sets)} task sets ({'; '.join(label(t) for t in cfg.task_sets)}); "
        f"pre-training {cfg.budget_s:g} s each (seed {cfg.pretrain_seed}) after a {cfg.probe_steps}-step "
        f"probe; {n_ft} fine-tunes ({', '.join(f'{t} {n} steps' for t, n in cfg.finetune_steps.items())}; "
        f"seeds {cfg.seeds}); expected ~{sum(mins.values()):.0f} min ("
        + ", ".join(f"{k} {v:.0f}" for k, v in mins.items())
        + f") on 2 CPU cores, {cfg.jobs} fine-tunes at a time; work dir {cfg.work_dir}",
        flush=True,
    )


def run_ablation(cfg: AblationConfig, command: str, quick: bool = False) -> dict:
    """Everything -> the result dict (rows in cfg.task_sets order). All probes run first, back to back, so
    that every task set is timed under the same load."""
    print_plan(cfg)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    cal = {tuple(ts): calibrate(ts, cfg) for ts in cfg.task_sets if ts}
    for ts, c in cal.items():
        steps = budget_steps(cfg.budget_s, c["steps_per_s"], c["startup_s"])
        print(f"calibrated {label(list(ts))}: {c['steps_per_s']:.2f} steps/s -> {steps} steps", flush=True)
    if not cfg.in_process:  # the estimate is for separate processes
        left = plan_minutes(cfg, slowdown(cal))
        print(f"expected from here: ~{left['pretraining'] + left['finetuning']:.0f} min", flush=True)
    pre = {ts: pretrain(list(ts), c, cfg) for ts, c in cal.items()}
    inits = [(ts, pre[tuple(ts)]["run_dir"] if ts else "none") for ts in cfg.task_sets]
    per_seed = finetune_all(inits, cfg)
    rows = [make_row(ts, pre.get(tuple(ts)), ps) for ts, ps in zip(cfg.task_sets, per_seed)]
    return {
        "budget_s": cfg.budget_s,
        "pretrain_seed": cfg.pretrain_seed,
        "seeds": cfg.seeds,
        "seeds_note": "each task set pre-trained once (pretrain_seed); every fine-tune repeated per seed "
        "(train.seed); _std = sample standard deviation over those seeds",
        "finetune_steps": cfg.finetune_steps,
        "finetune_jobs": cfg.jobs,
        "quick": quick,
        "env": {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "load_average_1min_start_end": [load_start, os.getloadavg()[0]],
        },
        "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        "command": command,
        "paper_source": PAPER_SOURCE,
        "rows": rows,
        "claims": claim_checks(rows),
    }
