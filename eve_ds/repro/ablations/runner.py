"""Running the ablations: a probe per task set for its rate, the budgeted pre-training, every fine-tune,
and the whole ablation as one result dict.

    calibrate: a short probe run per task set -> its steps/s (the first logged window, start-up, apart)
    pretrain:  train.max_steps = what fits in the budget at that rate (a full schedule ending on time);
               the loop seconds actually spent are read back from metrics.jsonl
    finetune:  every (task set, task, seed), `train.init_from=<pre-training run>` or `none`

Every run is a fresh process of the project's trainer (`run_training`; --quick: in this process), under one
work dir keyed by the budget and step counts, and is reused when it has finished; an unfinished one is
deleted and redone (a resumed pre-training would not spend its budget in one piece).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eve_ds.repro import paper
from eve_ds.repro.ablations.spec import (
    EXTRA_METRICS,
    FINETUNE_COST_S,
    FINETUNES,
    PRETRAIN_CONFIG,
    PRETRAIN_FIXED_S,
    PROBE_FIXED_S,
    REFERENCE_RATES,
    AblationConfig,
    label,
    slug,
)
from eve_ds.repro.ablations.summary import claim_checks, make_row
from eve_ds.train.launch import run_training
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

# -- pre-training at a wall-clock budget ---------------------------------------------------------------


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


def _finished(run_dir: Path) -> bool:
    """True when `run_dir` has finished (reuse it); otherwise clear what an interrupted run left."""
    if RunDir(run_dir).is_finished():
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
    logger.info(f"run: probe {label(task_set)}, {cfg.probe_steps} steps")
    extra = [f"train.log_every={cfg.probe_log_every}", "train.eval_batches=1"]
    overrides = _pretrain_overrides(task_set, cfg.probe_steps, cfg, extra)
    run_training(PRETRAIN_CONFIG, probe, overrides, in_process=cfg.in_process)
    rate, startup = rate_from_windows(RunDir(probe).windows())
    result = {"steps_per_s": rate, "startup_s": startup, "probe_steps": cfg.probe_steps}
    atomic_write_json(path, result)
    shutil.rmtree(probe)  # its checkpoint is not needed
    return result


def pretrain(task_set: list[str], cal: dict, cfg: AblationConfig) -> dict:
    """Pre-train for the budget at the calibrated rate -> the row's pre-training fields and the run dir."""
    run_dir = _pretrain_dir(task_set, cfg) / "run"
    steps = budget_steps(cfg.budget_s, cal["steps_per_s"], cal["startup_s"])
    if not _finished(run_dir):
        logger.info(f"run: pre-training {label(task_set)}, {steps} steps")
        overrides = _pretrain_overrides(task_set, steps, cfg, [])
        run_training(PRETRAIN_CONFIG, run_dir, overrides, in_process=cfg.in_process)
    run = RunDir(run_dir)
    windows, final = run.windows(), run.final_metrics()
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
        return RunDir(run_dir).final_metrics()
    overrides = [
        *cfg.finetune_overrides,
        *cfg.task_overrides.get(task, []),
        f"train.max_steps={steps}",
        f"train.init_from={init}",
        f"train.seed={seed}",
        *([f"data.cache_dir={cfg.cache_dir}"] if cfg.cache_dir else []),
    ]
    logger.info(f"run: fine-tuning {task} from {init}, seed {seed}")
    run_training(config, run_dir, overrides, in_process=cfg.in_process, threads=1 if cfg.jobs > 1 else None)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~90 MB each, and only the metrics count
    return RunDir(run_dir).final_metrics()


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
        logger.info(f"  {label(task_set)} / {task} seed {seed}: {metric}={res[metric]:.4g}")
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


def log_plan(cfg: AblationConfig) -> None:
    mins = plan_minutes(cfg)
    n_ft = len(cfg.task_sets) * len(cfg.seeds) * len(FINETUNES)
    logger.info(
        f"ablation plan: {len(cfg.task_sets)} task sets ({'; '.join(label(t) for t in cfg.task_sets)}); "
        f"pre-training {cfg.budget_s:g} s each (seed {cfg.pretrain_seed}) after a {cfg.probe_steps}-step "
        f"probe; {n_ft} fine-tunes ({', '.join(f'{t} {n} steps' for t, n in cfg.finetune_steps.items())}; "
        f"seeds {cfg.seeds}); expected ~{sum(mins.values()):.0f} min ("
        + ", ".join(f"{k} {v:.0f}" for k, v in mins.items())
        + f") on 2 CPU cores, {cfg.jobs} fine-tunes at a time; work dir {cfg.work_dir}"
    )


def run_ablation(cfg: AblationConfig, command: str, quick: bool = False) -> dict:
    """Everything -> the result dict (rows in cfg.task_sets order). All probes run first, back to back, so
    that every task set is timed under the same load."""
    log_plan(cfg)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    cal = {tuple(ts): calibrate(ts, cfg) for ts in cfg.task_sets if ts}
    for ts, c in cal.items():
        steps = budget_steps(cfg.budget_s, c["steps_per_s"], c["startup_s"])
        logger.info(f"calibrated {label(list(ts))}: {c['steps_per_s']:.2f} steps/s -> {steps} steps")
    if not cfg.in_process:  # the estimate is for separate processes
        left = plan_minutes(cfg, slowdown(cal))
        logger.info(f"expected from here: ~{left['pretraining'] + left['finetuning']:.0f} min")
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
        "paper_source": paper.ABLATIONS_SOURCE,
        "rows": rows,
        "claims": claim_checks(rows),
    }
