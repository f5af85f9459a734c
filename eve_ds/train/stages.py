"""Chained stages of one run, on the one trainer: EVLM's stage 0 before the run proper.

`train_run(cfg, run_dir)` is what `eve-pretrain` calls. For most runs it is `Trainer(cfg, run_dir).train()`.
An EVLM run with `stage0.enabled` and no `model.lm_path` first needs a language model; stage 0 [ours]
makes one:

1. RUN/stage0 is a run of its own (config.yaml, metrics.jsonl, checkpoints, final_metrics.json) through
   the same Trainer: `model.stage=stage0` (the LM alone trains; the task gives text-only rows, every token
   labelled) with the optimiser and length of the `stage0` section, no LR phase, and the flavor's scratch
   tower in place of the run's (`stage0_model`). It resumes like any run.
2. Its LM is saved with `save_pretrained` (and the task's tokenizer) into RUN/lm, atomically.
3. The run proper uses `model.lm_path=RUN/lm` (absolute) as its frozen LM.

A finished stage is never redone: RUN/lm present means stage 0 is done (rerunning the command resumes
the run proper); RUN/stage0 complete but RUN/lm missing (a crash between the two) only re-saves the LM.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from eve_ds.models.evlm.config import EVLMConfig, get_config
from eve_ds.train.config import ConfigError, RunConfig
from eve_ds.train.distributed import barrier
from eve_ds.train.evlm_tower import eve_tower_problem
from eve_ds.train.trainer import Trainer

logger = logging.getLogger(__name__)

STAGE0_DIR, LM_DIR = "stage0", "lm"


def needs_stage0(cfg: RunConfig) -> bool:
    return cfg.stage0.enabled and not cfg.model.lm_path


def stage0_config(cfg: RunConfig) -> RunConfig:
    """The stage-0 run of `cfg`: the LM alone, text only, with the `stage0` section's schedule."""
    s = cfg.stage0
    train = dataclasses.replace(
        cfg.train,
        max_steps=s.max_steps,
        stop_after=None,
        global_batch_size=s.batch_size,
        micro_batch_size=s.batch_size,
        grad_accum_steps=None,
        checkpoint_every=s.max_steps,
        eval_every=s.max_steps,
        log_every=min(cfg.train.log_every, s.max_steps),
        init_from=None,
    )
    optim = dataclasses.replace(
        cfg.optim,
        lr=s.lr,
        min_lr=s.min_lr,
        warmup_steps=s.warmup_steps,
        warmup_ratio=None,
        weight_decay=s.weight_decay,
        phase_start=None,  # the run proper's late-joining tower is frozen in stage 0
        phase_params=[],
    )
    return dataclasses.replace(
        cfg,
        model=stage0_model(cfg),
        train=train,
        optim=optim,
        stage0=dataclasses.replace(s, enabled=False),
        name=f"{cfg.name}_stage0",
    )


# The tower's fields, which stage 0 takes from the flavor's defaults (`stage0_model`).
TOWER_FIELDS = ("vision", "vision_name", "vision_path", "vision_kwargs", "vision_patch", "vision_width",
                "vision_depth", "vision_mlp", "feature_layers")  # fmt: skip


def stage0_model(cfg: RunConfig) -> EVLMConfig:
    """Stage 0's model: the run's, frozen as `stage0`, with the flavor's own scratch tower. Its rows have
    no image, so the tower is never run; a tower from files would only be loaded for nothing, and a frozen
    MoE tower (an EVE encoder's experts) leaves DeepSpeed's ZeRO without the expert group it requires."""
    default = get_config(cfg.model_flavor)
    tower = {k: getattr(default, k) for k in TOWER_FIELDS}
    return dataclasses.replace(cfg.model, stage="stage0", **tower)


def run_stage0(cfg: RunConfig, run_dir: Path, allow_changes: bool = False) -> Path:
    """Train (or resume, or skip when done) stage 0 of `cfg` in RUN/stage0 -> the saved LM, RUN/lm."""
    lm_dir = (run_dir / LM_DIR).resolve()
    if (lm_dir / "config.json").is_file():
        logger.info("stage 0: the LM of %s is there; not trained again", lm_dir)
        return lm_dir
    logger.info("stage 0: training the language model alone on text (%d steps)", cfg.stage0.max_steps)
    trainer = Trainer(stage0_config(cfg), run_dir / STAGE0_DIR, allow_changes=allow_changes)
    code = trainer.train()
    if code != 0:
        raise Stage0Stopped(code)
    if trainer.rank == 0:
        trainer.engine.module.encoder.export_lm(str(lm_dir), tokenizer=trainer.task.tokenizer)
        logger.info("stage 0: saved the language model to %s", lm_dir)
    barrier()
    return lm_dir


class Stage0Stopped(Exception):
    """Stage 0 stopped before its end (a signal): its exit code, for the command to return."""


def train_run(cfg: RunConfig, run_dir: Path, allow_changes: bool = False) -> int:
    """The run of `cfg` in `run_dir`, stage 0 first when it needs one (module doc) -> the exit code."""
    run_dir = Path(run_dir)
    if needs_stage0(cfg):
        problem = eve_tower_problem(cfg.model)  # before stage 0, whose model has no tower from files
        if problem:
            raise ConfigError(problem)
        try:
            lm = run_stage0(cfg, run_dir, allow_changes)
        except Stage0Stopped as stop:
            return stop.args[0]
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lm_path=str(lm)))
    return Trainer(cfg, run_dir, allow_changes=allow_changes).train()
