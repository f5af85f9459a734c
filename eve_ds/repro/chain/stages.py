"""What runs inside a small stage's job (`python -m eve_ds.cli.reproduce run-stage RUN_ROOT STAGE`): the
export, the evaluations and the report, as library calls. Training stages run through their job script."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from eve_ds.repro.chain.plan import (
    Evaluation,
    Stage,
    by_name,
    plan,
    read_plan,
    record_stage_run,
    task_data_root,
)
from eve_ds.repro.chain.report import markdown, write_report
from eve_ds.utils.io import atomic_write_json

logger = logging.getLogger(__name__)


def run_planned_stage(run_root: Path, name: str) -> int:
    """Run stage `name` of the chain recorded in RUN_ROOT/reproduce/plan.json and record its wall time and
    exit code for the report. -> the exit code."""
    params = read_plan(run_root)
    stage = by_name(plan(params["size"], params["corpus"], params["overrides"]))[name]
    start, rc = time.time(), 1
    try:
        rc = run_stage(stage, run_root)
    finally:
        record_stage_run(run_root, stage.name, start, rc)
    return rc


def run_stage(stage: Stage, run_root: Path) -> int:
    """Export, evaluation or report. -> 0, or 2 when the export or an evaluation failed."""
    if stage.kind == "export":
        return export(run_root / stage.source, run_root / stage.name)
    if stage.kind == "report":
        logger.info(markdown(write_report(run_root)))
        return 0
    if stage.kind != "evaluate":
        raise ValueError(f"stage {stage.name} ({stage.kind}) runs through its job script, not run-stage")
    run_dir = run_root / stage.source
    data_root = task_data_root(run_dir)
    for e in stage.evaluations:
        rc = evaluate(e, run_dir, data_root, run_root)
        if rc:
            return rc
    return 0


def export(src: Path, dst: Path) -> int:
    """The pre-training's checkpoint -> a native fp32 export (what `eve-convert export SRC DST` writes)."""
    from eve_ds.convert import export as export_checkpoint
    from eve_ds.convert.ds_checkpoint import ConvertError

    try:
        export_checkpoint(str(src), str(dst), dtype="fp32", fmt="native", overwrite=False)
    except (ConvertError, FileExistsError) as e:
        logger.error(f"export {src} -> {dst}: {e}")
        return 2
    logger.info(f"wrote {dst}")
    return 0


def evaluate(e: Evaluation, run_dir: Path, data_root: str, run_root: Path) -> int:
    """`e`'s metrics of the model in `run_dir` (what `eve-evaluate` computes) -> JSON in `e.output`, written
    atomically: its existence marks the evaluation done."""
    from eve_ds.train.evaluation import EvalRequest, evaluate_checkpoint

    request = EvalRequest(
        task=e.task,
        data_root=data_root,
        split=e.split,
        dataset=e.dataset,
        predictions=str(run_root / e.predictions) if e.predictions else None,
    )
    logger.info(f"evaluate {run_dir}: {request}")
    try:
        metrics = evaluate_checkpoint(str(run_dir), request)
    except (ValueError, FileNotFoundError) as err:  # a missing or malformed data file: the stage fails
        logger.error(f"evaluate {e.task} {e.split}: {err}")
        return 2
    logger.info(f"{e.output}: {metrics}")
    atomic_write_json(run_root / e.output, metrics)
    return 0
