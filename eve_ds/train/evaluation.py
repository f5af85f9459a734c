"""Evaluate a checkpoint (run dir, DeepSpeed tag dir or native export) without a trainer: the library
behind `eve-evaluate` and the reproduction chain's evaluation stages.

    metrics = evaluate_checkpoint("runs/vqa", task="vqa", data_root="data/vqa", split="test-dev")
"""

from __future__ import annotations

from dataclasses import dataclass

from eve_ds.convert import load_pretraining_model
from eve_ds.data import load_tokenizer
from eve_ds.data.config import DataConfig
from eve_ds.tasks.base import Task, TaskContext, build_task
from eve_ds.tasks.config import TaskConfig
from eve_ds.train.distributed import resolve_device


@dataclass
class EvalRequest:
    """What to evaluate. `task="msm"` reads validation shards (`data`); a downstream task reads `split` of
    the files under `data_root`."""

    task: str = "msm"
    data: str | None = None  # msm: validation shards (a shard directory or brace spec)
    data_root: str | None = None  # downstream task: the dataset's files as distributed
    split: str | None = None
    dataset: str | None = None  # retrieval: coco | flickr30k
    rerank_k: int | None = None  # retrieval: ITC top-k re-scored by ITM
    predictions: str | None = None  # write the task's prediction file here
    skip_bad_images: bool = False
    batch_size: int = 32
    max_batches: int = 0  # msm: 0 = the whole set
    seed: int = 1234
    synthetic: bool = False  # msm: also the attribute-word probe (default: from the checkpoint's config)


def evaluate_checkpoint(checkpoint: str, request: EvalRequest, device: str = "auto") -> dict:
    """The metrics of `request` for the model in `checkpoint`: the task's own evaluation (pre-training's
    is the one the trainer validates with)."""
    device = resolve_device(device)
    model, config = load_pretraining_model(checkpoint, device=device)
    task = checkpoint_task(model, config, request)
    split = request.data if request.task == "msm" else request.split  # msm: a split is a shard spec
    return task.evaluate_split(
        model, split, device=device, batch_size=request.batch_size, predictions=request.predictions
    )


def checkpoint_task(model, config: dict, request: EvalRequest) -> Task:
    """The task of `request`, configured as the checkpoint's run had it, with the request's data."""
    run = config.get("run") or {}
    saved = (run.get("task") or {}) | {
        "name": request.task,
        "data_root": request.data_root,
        "synthetic": False,
    }
    if request.dataset:
        saved["dataset"] = request.dataset
    if request.rerank_k:
        saved["rerank_k"] = request.rerank_k
    saved["skip_bad_eval_images"] = request.skip_bad_images
    cfg = TaskConfig(**{k: v for k, v in saved.items() if k in TaskConfig.__dataclass_fields__})
    data = run.get("data") or {}
    tokenizer = data.get("tokenizer") or "bert-base-uncased"
    # msm: only whether to run the synthetic corpus's probe; the shards are the request's.
    synthetic = request.synthetic or bool(data.get("synthetic", False))
    mcfg = model.model_cfg
    ctx = TaskContext(
        tokenizer=load_tokenizer(tokenizer),
        cache_dir="",
        image_size=mcfg.image_size,
        max_text_len=mcfg.max_text_len,
        seed=request.seed,
        num_workers=0,
        data=DataConfig(train=[], synthetic=synthetic, tokenizer=tokenizer),
        eval_batches=request.max_batches,
    )
    task = build_task(cfg, ctx)
    task.load_assets(config.get("task") or {})
    return task
