"""The paper's Table 2 (VQA v2, NLVR2) and fine-tuned retrieval (its Table 4), reproduced by one chain of
Slurm jobs under one run root, and the report that compares the chain's numbers with the paper's.

    pretrain -> export -> retrieval_coco -> vqa, nlvr2, retrieval_flickr (in parallel)
             -> eval_retrieval_coco, eval_vqa, eval_nlvr2, eval_retrieval_flickr -> report

Every stage writes under RUN_ROOT/<stage> (training, export) or RUN_ROOT/eval/ and is complete when its
outputs exist, so a rerun submits only what is missing (and what depends on it). The pieces:

    plan(size, corpus, run_root, overrides) -> [Stage]     what runs, from what, with which config
    decide(stages, complete, active) -> {stage: action}     skip / wait / submit / fresh
    preflight_problems(...)                                 every training config checked before sbatch
    submit(...), job_states(...)                            sbatch with afterok dependencies, squeue
    build_report(run_root) / write_report(run_root)         report.json + report.md

The stages run the project's ordinary commands: training through slurm/launch.sh (requeue + exact resume),
export / evaluation / report as small jobs of `python -m eve_ds.cli.table2_report run-stage`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from eve_ds.utils.io import atomic_write_json, atomic_write_text

SIZES = ("tiny", "base", "large")
CORPORA = ("4m", "16m")

# -- the paper's numbers -----------------------------------------------------------------------------

# EVE (Chen et al., AAAI 2024, arXiv:2308.11971): Table 2 (VQA v2 test-dev, NLVR2 dev / test-P) and Table 4
# (fine-tuned retrieval, COCO 5K and Flickr30K 1K test), in percent, keyed (task, metric, split). EVE-Base
# on the 4M corpus as quoted in the reproduction issue; the paper's tables themselves could not be read
# from here, so every number not quoted there (the Large models, R@5 / R@10) is None: never guessed.
PAPER_SOURCE = "EVE (AAAI 2024) Table 2 (VQA, NLVR2) and Table 4 (retrieval)"
PAPER: dict[tuple[str, str], dict[tuple[str, str, str], float]] = {
    ("base", "4m"): {
        ("vqa", "vqa_score", "test-dev"): 78.00,
        ("nlvr2", "nlvr2_acc", "dev"): 83.34,
        ("nlvr2", "nlvr2_acc", "test-P"): 83.93,
        ("retrieval_coco", "tr_r1", "test"): 79.6,
        ("retrieval_coco", "ir_r1", "test"): 62.0,
        ("retrieval_flickr30k", "tr_r1", "test"): 95.6,
        ("retrieval_flickr30k", "ir_r1", "test"): 84.1,
    },
    ("large", "4m"): {},
    ("large", "16m"): {},
}

RECALLS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
EVALAI_FILE = (
    "eval/vqa_test-dev_evalai.json"  # {"overall": score in percent}, from `eve-report --vqa-test-dev`
)


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
    Row("vqa", "vqa_score", "minival", "vqa/final_metrics.json", "vqa_score", 100.0),
    Row("nlvr2", "nlvr2_acc", "dev", "eval/nlvr2_dev.json", "nlvr2_acc", 100.0),
    Row("nlvr2", "nlvr2_acc", "test-P", "eval/nlvr2_test1.json", "nlvr2_acc", 100.0),
    *(Row("retrieval_coco", m, "test", "eval/retrieval_coco_test.json", m) for m in RECALLS),
    *(Row("retrieval_flickr30k", m, "test", "eval/retrieval_flickr30k_test.json", m) for m in RECALLS),
)

# -- the plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One `eve-evaluate` call of an evaluation stage; paths relative to the run root."""

    task: str
    split: str
    output: str
    dataset: str | None = None
    predictions: str | None = None


@dataclass(frozen=True)
class Stage:
    """One job of the chain. `source`: the stage whose output this one reads (training: its init;
    export / evaluation: the run it exports or evaluates). `outputs` (relative to the run root) all exist
    when the stage is complete. `tasks` / `gpus`: the job's world size (for preflight) and GPUs."""

    name: str
    kind: str  # train | export | evaluate | report
    deps: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    source: str | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    script: str | None = None
    sbatch: tuple[str, ...] = ()
    tasks: int = 1
    gpus: int = 0
    evaluations: tuple[Evaluation, ...] = ()


PRETRAIN_CONFIG = {
    ("tiny", "4m"): "eve_tiny_synthetic",
    ("base", "4m"): "eve_base_4m",
    ("large", "4m"): "eve_large_4m",
    ("large", "16m"): "eve_large_16m",
}
# Fine-tuning stage -> size -> (packaged config, the stage's own overrides).
FINETUNE_CONFIG: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "retrieval_coco": {
        "tiny": ("retrieval_tiny_synthetic", ("task.dataset=coco",)),
        "base": ("retrieval_coco_eve_base", ()),
        "large": ("retrieval_coco_eve_large", ()),
    },
    "vqa": {"tiny": ("vqa_tiny_synthetic", ()), "base": ("vqa_eve_base", ()), "large": ("vqa_eve_large", ())},
    "nlvr2": {
        "tiny": ("nlvr2_tiny_synthetic", ()),
        "base": ("nlvr2_eve_base", ()),
        "large": ("nlvr2_eve_large", ()),
    },
    "retrieval_flickr": {
        "tiny": ("retrieval_tiny_synthetic", ("task.dataset=flickr30k",)),
        "base": ("retrieval_flickr_eve_base", ()),
        "large": ("retrieval_flickr_eve_large", ()),
    },
}
FINETUNES = tuple(FINETUNE_CONFIG)
TRAIN_STAGES = ("pretrain", *FINETUNES)


@dataclass(frozen=True)
class Resources:
    """A job's Slurm resources for one kind of stage: extra sbatch options (on top of the job script's
    #SBATCH lines), tasks (= data-parallel world size) and GPUs."""

    sbatch: tuple[str, ...] = ()
    tasks: int = 1
    gpus: int = 0


_TINY_CPU = ("--nodes=1", "--cpus-per-task=1", "--mem=2000", "--time=01:00:00")


def _gpu_cluster(pretrain_gpus: int) -> dict[str, Resources]:
    """Pre-training on the job script's nodes (the paper: 16 A100 for EVE-Base, 32 for EVE-Large),
    fine-tuning on finetune.sh's one 8-GPU node, evaluation on one GPU, export and report on CPUs."""
    one = ("--nodes=1", "--ntasks=1")
    return {
        "pretrain": Resources((), pretrain_gpus, pretrain_gpus),
        "finetune": Resources((), 8, 8),
        "export": Resources((*one, "--cpus-per-task=8", "--mem=64G", "--time=02:00:00")),
        "evaluate": Resources((*one, "--gpus=1", "--cpus-per-task=10", "--mem=64G", "--time=08:00:00"), 1, 1),
        "report": Resources((*one, "--cpus-per-task=1", "--mem=4G", "--time=00:30:00")),
    }


RESOURCES: dict[str, dict[str, Resources]] = {
    # One CPU per job, so that the three fine-tunes share the local cluster's 2 CPUs; pretrain_tiny.sh's
    # 2 tasks become 1 (model.ep_size=1 in the plan): the same chain, faster on a small machine.
    "tiny": {
        "pretrain": Resources(("--ntasks-per-node=1",)),
        "finetune": Resources((*_TINY_CPU, "--ntasks-per-node=1", "--gpus-per-node=0")),
        **{kind: Resources((*_TINY_CPU, "--ntasks=1")) for kind in ("export", "evaluate", "report")},
    },
    "base": _gpu_cluster(16),
    "large": _gpu_cluster(32),
}
PRETRAIN_SCRIPT = {
    "tiny": "slurm/pretrain_tiny.sh",
    "base": "slurm/pretrain_base.sh",
    "large": "slurm/pretrain_large.sh",
}


class PlanError(ValueError):
    """A bad --size / --corpus / override: nothing is submitted."""


def check_size(size: str, corpus: str) -> None:
    if size not in SIZES:
        raise PlanError(f"--size {size!r}: expected one of {list(SIZES)}")
    if corpus not in CORPORA:
        raise PlanError(f"--corpus {corpus!r}: expected one of {list(CORPORA)}")
    if (size, corpus) not in PRETRAIN_CONFIG:
        have = [f"{s} {c}" for s, c in PRETRAIN_CONFIG]
        raise PlanError(f"--size {size} --corpus {corpus}: no such pre-training (have {', '.join(have)})")


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`KEY=VALUE` (every training stage), `STAGE:KEY=VALUE` (one of TRAIN_STAGES) and
    `finetune:KEY=VALUE` (the four fine-tunes) -> {training stage: its overrides, in the given order}."""
    out: dict[str, list[str]] = {s: [] for s in TRAIN_STAGES}
    for item in overrides:
        head, colon, rest = item.partition(":")
        scoped = bool(colon) and "=" not in head
        target, kv = (head, rest) if scoped else (None, item)
        if "=" not in kv or kv.startswith("="):
            raise PlanError(f"override {item!r}: expected KEY=VALUE, STAGE:KEY=VALUE or finetune:KEY=VALUE")
        if target is not None and target not in (*TRAIN_STAGES, "finetune"):
            raise PlanError(
                f"override {item!r}: no training stage {target!r} (have {[*TRAIN_STAGES, 'finetune']})"
            )
        if target is None and kv.split("=", 1)[0] == "train.init_from":
            raise PlanError(
                f"override {item!r}: every stage's init comes from the one before it; give pre-training's as "
                "pretrain:train.init_from=PATH"
            )
        stages = TRAIN_STAGES if target is None else FINETUNES if target == "finetune" else (target,)
        for s in stages:
            out[s].append(kv)
    return out


# Evaluation stage -> (the fine-tune it evaluates, its `eve-evaluate` calls).
EVALUATIONS: dict[str, tuple[str, tuple[Evaluation, ...]]] = {
    "eval_retrieval_coco": (
        "retrieval_coco",
        (Evaluation("retrieval", "test", "eval/retrieval_coco_test.json", dataset="coco"),),
    ),
    "eval_vqa": (
        "vqa",
        (
            Evaluation(
                "vqa", "test-dev", "eval/vqa_test-dev.json", predictions="eval/vqa_test-dev_predictions.json"
            ),
        ),
    ),
    "eval_nlvr2": ("nlvr2", tuple(Evaluation("nlvr2", s, f"eval/nlvr2_{s}.json") for s in ("dev", "test1"))),
    "eval_retrieval_flickr": (
        "retrieval_flickr",
        (Evaluation("retrieval", "test", "eval/retrieval_flickr30k_test.json", dataset="flickr30k"),),
    ),
}


def plan(size: str, corpus: str, overrides: list[str] | None = None) -> list[Stage]:
    """The chain's stages in dependency order. Paths (outputs, sources) are relative to the run root."""
    check_size(size, corpus)
    user = split_overrides(overrides or [])
    res = RESOURCES[size]
    own = ("model.ep_size=1",) if size == "tiny" else ()  # the tiny job script's ep_size=2 needs 2 tasks
    pretrain = PRETRAIN_CONFIG[size, corpus]
    stages = [
        _train("pretrain", pretrain, (*own, *user["pretrain"]), None, res["pretrain"], PRETRAIN_SCRIPT[size]),
        Stage(
            "export",
            "export",
            deps=("pretrain",),
            outputs=("export/config.json", "export/model.safetensors"),
            source="pretrain",
            sbatch=res["export"].sbatch,
        ),
    ]
    for name in FINETUNES:
        config, own = FINETUNE_CONFIG[name][size]
        init = "export" if name == "retrieval_coco" else "retrieval_coco"  # [paper] all from COCO retrieval
        stages.append(_train(name, config, (*own, *user[name]), init, res["finetune"], "slurm/finetune.sh"))
    ev = res["evaluate"]
    for name, (source, calls) in EVALUATIONS.items():
        outputs = tuple(c.output for c in calls)
        stages.append(
            Stage(
                name,
                "evaluate",
                (source,),
                outputs,
                source,
                sbatch=ev.sbatch,
                gpus=ev.gpus,
                evaluations=calls,
            )
        )
    report = Stage(
        "report", "report", tuple(EVALUATIONS), ("report.json", "report.md"), sbatch=res["report"].sbatch
    )
    return [*stages, report]


def _train(
    name: str, config: str, overrides: tuple[str, ...], init: str | None, res: Resources, script: str
) -> Stage:
    deps = (init,) if init else ()
    return Stage(
        name,
        "train",
        deps,
        (f"{name}/final_metrics.json",),
        init,
        config,
        overrides,
        script,
        res.sbatch,
        res.tasks,
        res.gpus,
    )


def train_overrides(stage: Stage, run_root: Path, init: str | None = None) -> list[str]:
    """A training stage's overrides: the init from the stage before it (`init` replaces that path: "none"
    in preflight while it does not exist yet), then the stage's own and the user's."""
    first = [f"train.init_from={init or run_root / stage.source}"] if stage.source else []
    return [*first, *stage.overrides]


def train_args(stage: Stage, run_root: Path) -> list[str]:
    """What the job script passes to the trainer: --config, --run-dir and the overrides."""
    return [
        "--config",
        stage.config,
        "--run-dir",
        str(run_root / stage.name),
        *train_overrides(stage, run_root),
    ]


def by_name(stages: list[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages}


# -- what to run --------------------------------------------------------------------------------------


def is_complete(stage: Stage, run_root: Path) -> bool:
    return all((run_root / o).exists() for o in stage.outputs)


def has_traces(stage: Stage, run_root: Path) -> bool:
    """Anything of the stage on disk: its run directory (training, export) or any of its outputs."""
    return (stage.kind in ("train", "export") and (run_root / stage.name).exists()) or any(
        (run_root / o).exists() for o in stage.outputs
    )


def decide(
    stages: list[Stage], complete: dict[str, bool], active: dict[str, bool], traces: dict[str, bool]
) -> dict[str, str]:
    """Per stage: "skip" (complete), "wait" (its job from an earlier submission is still queued or
    running), "submit" (missing, failed or preempted: a training stage resumes from its checkpoint), or
    "fresh" (an earlier stage runs again, so what this one left on disk is stale: set aside, start over)."""
    actions: dict[str, str] = {}
    for s in stages:
        upstream = any(actions[d] != "skip" for d in s.deps)
        if active.get(s.name):
            actions[s.name] = "wait"
        elif upstream:
            actions[s.name] = "fresh" if traces[s.name] else "submit"
        else:
            actions[s.name] = "skip" if complete[s.name] else "submit"
    return actions


def set_aside(stage: Stage, run_root: Path) -> list[Path]:
    """Move what a stale stage left (its run directory for training and export, else its outputs) to
    RUN_ROOT/stale/<name>-<time>/, so that it starts over and nothing stale counts as done. -> new paths."""
    dst = run_root / "stale" / f"{stage.name}-{datetime.now():%Y%m%d-%H%M%S}"
    paths = (
        [run_root / stage.name]
        if stage.kind in ("train", "export")
        else [run_root / o for o in stage.outputs]
    )
    moved = []
    for src in paths:
        if src.exists():
            target = dst if stage.kind in ("train", "export") else dst / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            src.rename(target)
            moved.append(target)
    return moved


# -- preflight ----------------------------------------------------------------------------------------


def preflight_problems(stages: list[Stage], run_root: Path, to_run: set[str]) -> list[str]:
    """Every problem of the training stages in `to_run`, as `eve-pretrain --dry-run` reports them (config
    errors, unset variables, missing shards / data roots / init, batch layout for the stage's world size).
    An init that a stage of this chain will produce is checked as `none` until it exists."""
    if not any(s.kind == "train" and s.name in to_run for s in stages):
        return []
    from eve_ds.train.config import ConfigError, load_config
    from eve_ds.train.preflight import preflight

    problems: list[str] = []
    stage = by_name(stages)
    for s in stages:
        if s.kind != "train" or s.name not in to_run:
            continue
        ready = s.source is None or (s.source not in to_run and is_complete(stage[s.source], run_root))
        try:
            cfg = load_config(s.config, train_overrides(s, run_root, None if ready else "none"))
        except ConfigError as e:
            problems.append(f"{s.name} (--config {s.config}): {e}")
            continue
        problems += [f"{s.name} (--config {s.config}): {p}" for p in preflight(cfg, s.tasks)["problems"]]
    return problems


def task_data_root(run_dir: Path) -> str:
    """The dataset directory a fine-tuning run read (its saved config): task.data_root, or for a synthetic
    set the directory it was generated into (found again, not regenerated, by the task's own code)."""
    from eve_ds.tasks.base import TaskContext, build_task
    from eve_ds.train.config import load_config

    cfg = load_config(str(run_dir / "config.yaml"))
    if not cfg.task.synthetic:
        return cfg.task.data_root
    m = cfg.model
    ctx = TaskContext(None, cfg.data.cache_dir, m.image_size, m.max_text_len, seed=cfg.train.seed)
    return build_task(cfg.task, ctx).root()


# -- Slurm --------------------------------------------------------------------------------------------

# squeue states of a job that has not ended yet (a requeued job is PENDING again, with the same id).
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
    | {"RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
)


def sbatch_argv(
    stage: Stage, run_root: Path, deps: list[int], after: str, python: str, root: Path
) -> list[str]:
    """`sbatch ...` of one stage: its log under RUN_ROOT/logs, the dependencies (`after`: afterok, or
    afterany for the report, which also reports a chain with failed stages); training stages run their job
    script (slurm/launch.sh), the others `python -m eve_ds.cli.table2_report run-stage`."""
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name=eve-{stage.name}",
        f"--output={run_root}/logs/{stage.name}-%j.out",
        "--open-mode=append",
    ]
    if deps:
        argv += [f"--dependency={after}:" + ":".join(map(str, deps)), "--kill-on-invalid-dep=yes"]
    argv += list(stage.sbatch)
    if stage.kind == "train":
        return [*argv, str(root / stage.script), *train_args(stage, run_root)]
    cmd = (
        f"cd {shlex.quote(str(root))} && export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}"
        f" && exec {shlex.quote(python)} -m eve_ds.cli.table2_report run-stage {shlex.quote(str(run_root))} "
        f"{stage.name}"
    )
    return [*argv, f"--wrap={cmd}"]


def sbatch(argv: list[str], env: dict, cwd: Path) -> int:
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return int(r.stdout.strip().split(";")[0])


def job_states(job_ids: list[int]) -> dict[int, str]:
    """{job id: Slurm state} of the jobs squeue still knows (ended ones for MinJobAge, default 5 min).
    Raises RuntimeError when squeue itself fails (not when it no longer knows a job)."""
    if not job_ids:
        return {}
    argv = ["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(map(str, job_ids))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    states = {}
    for line in r.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        if jid.isdigit():
            states[int(jid)] = state
    return states


def read_jobs(run_root: Path) -> dict[str, dict]:
    path = run_root / "reproduce" / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_jobs(run_root: Path, new: dict[str, dict]) -> None:
    atomic_write_json(run_root / "reproduce" / "jobs.json", {**read_jobs(run_root), **new})


def write_plan(run_root: Path, size: str, corpus: str, overrides: list[str]) -> dict | None:
    """Record the chain's parameters (the stage jobs and the report read them). -> the previous ones."""
    path = run_root / "reproduce" / "plan.json"
    old = json.loads(path.read_text()) if path.exists() else None
    atomic_write_json(path, {"size": size, "corpus": corpus, "overrides": list(overrides)})
    return old


def read_plan(run_root: Path) -> dict:
    path = run_root / "reproduce" / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; {run_root} is not a run root of slurm/reproduce.sh")
    return json.loads(path.read_text())


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


def _run_record(stage: Stage, run_root: Path) -> dict | None:
    """What a small stage's job recorded (record_stage_run); None for training stages and before a run."""
    if stage.kind == "train":
        return None
    return _read_json(run_root / "reproduce" / "stages" / f"{stage.name}.json")


def stage_seconds(stage: Stage, run_root: Path) -> float | None:
    if stage.kind == "train":
        return launch_seconds(run_root / stage.name)
    return (_run_record(stage, run_root) or {}).get("seconds")


def stage_status(stage: Stage, run_root: Path) -> str:
    """complete | failed (a small stage's job exited non-zero) | incomplete (something on disk: running,
    preempted or failed) | not started."""
    if is_complete(stage, run_root):
        return "complete"
    if (_run_record(stage, run_root) or {}).get("exit_code", 0) != 0:
        return "failed"
    return "incomplete" if has_traces(stage, run_root) else "not started"


def record_stage_run(run_root: Path, name: str, start: float, rc: int) -> None:
    """What a small stage's job leaves for the report: its wall time and exit code."""
    atomic_write_json(
        run_root / "reproduce" / "stages" / f"{name}.json",
        {
            "seconds": time.time() - start,
            "exit_code": rc,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "ended": datetime.now().isoformat(timespec="seconds"),
        },
    )


# -- the report ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(run_root: Path, size: str, corpus: str) -> list[dict]:
    """One row per task, metric and split: ours (percent, None until its stage has run), the paper's
    (None where it is not known, and for the tiny model) and the difference."""
    paper = PAPER.get((size, corpus), {})
    out = []
    for r in ROWS:
        data = _read_json(run_root / r.source) or {}
        ours = data.get(r.key)
        ours = round(ours * r.scale, 2) if isinstance(ours, (int, float)) else None
        ref = paper.get((r.task, r.metric, r.split))
        row = {
            "task": r.task,
            "metric": r.metric,
            "split": r.split,
            "value": ours,
            "paper": ref,
            "diff": round(ours - ref, 2) if ours is not None and ref is not None else None,
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
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    recs = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written right now
            rec = json.loads(line)
            if "samples_per_s" in rec:
                recs.append(rec)
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
    st = stage_rows(stages, run_root)
    gpu_hours = [s["gpu_hours"] for s in st if s["gpu_hours"] is not None]
    return {
        "size": params["size"],
        "corpus": params["corpus"],
        "run_root": str(run_root),
        "paper_source": PAPER_SOURCE,
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
    lines = [
        f"# Table 2 reproduction: {title}",
        "",
        f"Run root: `{report['run_root']}`",
        "",
        "| task | metric | split | ours | paper | diff |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['split']} | {_fmt(r['value'])} | {_fmt(r['paper'])} | "
            f"{_fmt(r['diff'])} |"
        )
    lines += ["", "| stage | status | wall h | GPUs | GPU h | job |", "|---|---|---:|---:|---:|---|"]
    for s in report["stages"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {_fmt(s['wall_hours'], 3)} | {s['gpus']} | "
            f"{_fmt(s['gpu_hours'], 3)} | {_fmt(s['job_id'])} |"
        )
    pre = report["pretraining"]
    lines += ["", f"GPU hours, all stages so far: {_fmt(report['gpu_hours'], 3)}."]
    if pre:
        lines.append(
            f"Pre-training: {_fmt(pre['pairs_per_s'])} pairs/s ({_fmt(pre['pairs_per_s_per_gpu'])} per GPU), "
            f"MFU {_fmt(pre['mfu'], 3)} (median over the logged windows)."
        )
    lines += [
        "",
        f"Percent throughout. Paper: {report['paper_source']}; — where the paper's number is not known "
        "here or not reported, and for the tiny model (no paper counterpart). VQA test-dev is scored by "
        f"EvalAI: submit eval/vqa_test-dev_predictions.json, then `eve-report RUN_ROOT --vqa-test-dev SCORE`.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_root: Path, size: str | None = None, corpus: str | None = None) -> dict:
    report = build_report(run_root, size, corpus)
    atomic_write_text(Path(run_root) / "report.md", markdown(report))
    atomic_write_json(Path(run_root) / "report.json", report)  # last: the report stage's completion mark
    return report
