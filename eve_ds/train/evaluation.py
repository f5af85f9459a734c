"""Evaluate a checkpoint (run dir, DeepSpeed tag dir or native export) without a trainer: the library
behind `eve-evaluate` and the reproduction chain's evaluation stages.

    metrics = evaluate_checkpoint("runs/vqa", task="vqa", data_root="data/vqa", split="test-dev")
"""

from __future__ import annotations

from dataclasses import dataclass

from eve_ds.convert import load_pretraining_model
from eve_ds.data import build_val_loader, load_tokenizer
from eve_ds.data.config import DataConfig
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.task import TaskContext, build_task
from eve_ds.train.distributed import resolve_device
from eve_ds.train.validation import attribute_ids_if_synthetic, evaluate


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
    """The metrics of `request` for the model in `checkpoint`."""
    device = resolve_device(device)
    model, config = load_pretraining_model(checkpoint, device=device)
    if request.task == "msm":
        return msm_metrics(model, config, request, device)
    return task_metrics(model, config, request, device)


def msm_metrics(model, config: dict, request: EvalRequest, device: str) -> dict:
    """Pre-training validation metrics on the shards `request.data`."""
    data_cfg = (config.get("run") or {}).get("data") or {}
    tokenizer = load_tokenizer(data_cfg.get("tokenizer", "bert-base-uncased"))
    synthetic = request.synthetic or bool(data_cfg.get("synthetic", False))
    attr_ids = (
        attribute_ids_if_synthetic(DataConfig(train=[], synthetic=True), tokenizer) if synthetic else None
    )
    mcfg = model.model_cfg
    loader = build_val_loader(
        request.data,
        image_size=mcfg.image_size,
        max_text_len=mcfg.max_text_len,
        batch_size=request.batch_size,
        tokenizer=tokenizer,
    )
    return evaluate(
        model,
        loader,
        device=device,
        seed=request.seed,
        max_batches=request.max_batches,
        attr_token_ids=attr_ids,
        image_norm=(data_cfg.get("image_mean"), data_cfg.get("image_std")),
    )


def task_metrics(model, config: dict, request: EvalRequest, device: str) -> dict:
    """A downstream task's metrics on `request.split` of the files under `request.data_root`."""
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
    mcfg = model.model_cfg
    ctx = TaskContext(
        tokenizer=load_tokenizer(((run.get("data") or {}).get("tokenizer")) or "bert-base-uncased"),
        cache_dir="",
        image_size=mcfg.image_size,
        max_text_len=mcfg.max_text_len,
        num_workers=0,
        image_mean=(run.get("data") or {}).get("image_mean"),
        image_std=(run.get("data") or {}).get("image_std"),
    )
    task = build_task(cfg, ctx)
    task.load_assets(config.get("task") or {})
    return task.evaluate_split(
        model, request.split, device=device, batch_size=request.batch_size, predictions=request.predictions
    )
