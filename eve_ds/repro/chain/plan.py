"""The Table 2 chain's plan: which stages run, from what, with which config and Slurm resources, and what a
rerun does with each (skip / wait / submit / fresh).

    pretrain -> export -> retrieval_coco -> vqa, nlvr2, retrieval_flickr (in parallel)
             -> eval_retrieval_coco, eval_vqa, eval_nlvr2, eval_retrieval_flickr -> report

Every stage writes under RUN_ROOT/<stage> (training, export) or RUN_ROOT/eval/ and is complete when its
outputs exist, so a rerun submits only what is missing (and what depends on it).

    plan(size, corpus, overrides) -> [Stage]                  what runs, from what, with which config
    decide(stages, complete, active, traces) -> {stage: action}
    preflight_problems(...)                                 every training config checked before sbatch
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from eve_ds.utils.io import atomic_write_json

SIZES = ("tiny", "base", "large")
CORPORA = ("4m", "16m")


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


# -- the chain's records ------------------------------------------------------------------------------


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


def stage_record(stage: Stage, run_root: Path) -> dict | None:
    """What a small stage's job recorded (record_stage_run); None for training stages and before a run."""
    if stage.kind == "train":
        return None
    try:
        return json.loads((run_root / "reproduce" / "stages" / f"{stage.name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
