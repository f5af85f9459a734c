"""Evaluate a checkpoint (run dir, DeepSpeed tag dir or native export) without a trainer: the library
behind `eve-evaluate` and the reproduction chain's evaluation stages.

    metrics = evaluate_checkpoint("runs/vqa", EvalRequest(data_root="data/vqa", split="test-dev"))
    metrics = evaluate_checkpoint("runs/eve_tiny_synthetic", EvalRequest())  # = the run's own validation
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from eve_ds.convert import load_pretraining_model
from eve_ds.convert.ds_checkpoint import (
    ConvertError,
    consolidated_state_dict,
    read_eve_config,
    resolve_tag_dir,
)
from eve_ds.data import load_tokenizer
from eve_ds.data.config import DataConfig
from eve_ds.models.weights import is_native_export
from eve_ds.tasks.base import Task, TaskContext, build_task
from eve_ds.tasks.config import BENCHMARK_TASKS, TaskConfig
from eve_ds.train.config import ConfigError, RunConfig, from_dict, task_context
from eve_ds.train.distributed import resolve_device
from eve_ds.train.family import family_of


@dataclass
class EvalRequest:
    """What to evaluate. Every field left None follows the checkpoint's run: its task, its validation data
    (msm: the run's validation shards; a downstream task: its data root or synthetic set and its
    `task.eval_split`), its micro-batch, `train.eval_batches` and `train.seed` — so a run's checkpoint
    scores exactly what the run's own validation scored."""

    task: str | None = None  # msm | vqa | retrieval | nlvr2 | evlm_synthetic | an EVLM benchmark
    data: str | None = None  # msm: validation shards (a shard directory or brace spec)
    data_root: str | None = None  # downstream task: the dataset's files as distributed
    split: str | None = None
    dataset: str | None = None  # retrieval: coco | flickr30k
    rerank_k: int | None = None  # retrieval: ITC top-k re-scored by ITM
    predictions: str | None = None  # write the task's prediction file here
    skip_bad_images: bool = False
    batch_size: int | None = None
    max_batches: int | None = None  # msm: batches per rank, 0 = the whole set
    seed: int | None = None  # msm: the validation masks' seed
    synthetic: bool = False  # msm: also the attribute-word probe (default: from the checkpoint's config)
    prompt_format: str | None = None  # EVLM benchmarks: task.bench_prompt (default: the run's, else auto)


# What a request falls back to without a run config (a native export of another origin).
DEFAULTS = {"task": "msm", "batch_size": 32, "max_batches": 0, "seed": 0}


def evaluate_checkpoint(checkpoint: str, request: EvalRequest, device: str = "auto") -> dict:
    """The metrics of `request` for the model in `checkpoint`: the task's own evaluation (pre-training's
    is the one the trainer validates with)."""
    device = resolve_device(device)
    model, config = load_checkpoint_model(checkpoint, device=device)
    run = run_config(config)
    request = follow_run(request, run)
    task = checkpoint_task(model, config, request, run)
    if run is not None and _is_run_validation(request, run):
        task.prepare()  # e.g. VQA's minival is held out of the run's own files
        return task.evaluate(
            model, request.split, device=device, dtype=torch.float32, batch_size=request.batch_size
        )
    split = request.data if request.task == "msm" else request.split  # msm: a split is a shard spec
    if request.task == "msm" and split is None:
        raise ConfigError(f"{checkpoint}: no validation shards in its config: pass --data SHARDS")
    return task.evaluate_split(
        model, split, device=device, batch_size=request.batch_size, predictions=request.predictions
    )


def load_checkpoint_model(checkpoint: str, device: str):
    """(model in eval mode, config dict) of a checkpoint of either family: EVE's through the converter
    (any ep_size, native exports too), EVLM's DeepSpeed checkpoints through `load_evlm_checkpoint`."""
    if not is_native_export(checkpoint):
        tag = resolve_tag_dir(checkpoint)
        config = read_eve_config(tag)
        if config.get("family") == "evlm":
            return load_evlm_checkpoint(tag, config).to(device).eval(), config
    return load_pretraining_model(checkpoint, device=device)


def load_evlm_checkpoint(tag, config: dict):
    """An EVLM run's model, in one process: built as the run built it (its frozen LM from `model.lm_path`,
    the other frozen weights from `train.seed`, then `train.init_from`: what an earlier stage trained), at
    ep_size 1, then the checkpoint's trainable weights (every expert from DeepSpeed's expert files, whatever
    ep_size saved them); every parameter missing from the files must be a frozen one."""
    run = from_dict(config["run"])
    run = replace(run, model=replace(run.model, ep_size=1))
    torch.manual_seed(run.train.seed)
    family = family_of(run)
    model = family.build_model(run)
    family.init_weights(model, run, ep_rank=0, resuming=True)
    module, _ = consolidated_state_dict(tag, None)  # MoE layers of any size (xattn, an EVE tower)
    missing, unexpected = model.load_state_dict(module, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(unexpected) + sorted(k for k in missing if k in trainable)
    if bad:
        raise ConvertError(f"{tag}: the checkpoint does not fit the run's model: {bad[:5]} ({len(bad)} keys)")
    return model


def run_config(config: dict) -> RunConfig | None:
    """The checkpoint's run config (resolved, as it ran), or None for an export that has none."""
    run = config.get("run")
    return from_dict(run) if run and "train" in run else None  # an import records only its data section


def follow_run(request: EvalRequest, run: RunConfig | None) -> EvalRequest:
    """`request` with its unset fields taken from the run (or DEFAULTS without one)."""
    if run is None:
        fallback = dict(DEFAULTS)
    else:
        fallback = {
            "task": run.task.name,
            "split": run.task.eval_split,
            "batch_size": run.train.micro_batch_size,
            "max_batches": run.train.eval_batches,
            "seed": run.train.seed,
        }
    if request.task in BENCHMARK_TASKS:  # a benchmark's splits are its own: None = its default
        fallback.pop("split", None)
    return replace(request, **{k: v for k, v in fallback.items() if getattr(request, k) is None})


def _is_run_validation(request: EvalRequest, run: RunConfig) -> bool:
    """True when the request asks for what the run validated on: same task, no other data."""
    if request.task != run.task.name or request.predictions:
        return False
    if request.task == "msm":
        return request.data is None
    return request.data_root is None and request.split == run.task.eval_split and not request.dataset


def checkpoint_task(model, config: dict, request: EvalRequest, run: RunConfig | None = None) -> Task:
    """The task of `request`, configured as the checkpoint's run had it, with the request's data."""
    saved = ((config.get("run") or {}).get("task") or {}) | {"name": request.task}
    if request.data_root or run is None or run.task.name != request.task:
        saved |= {"data_root": request.data_root, "synthetic": False}
    if request.dataset:
        saved["dataset"] = request.dataset
    if request.rerank_k:
        saved["rerank_k"] = request.rerank_k
    if request.prompt_format:
        saved["bench_prompt"] = request.prompt_format
    saved["skip_bad_eval_images"] = request.skip_bad_images
    cfg = TaskConfig(**{k: v for k, v in saved.items() if k in TaskConfig.__dataclass_fields__})
    data = (config.get("run") or {}).get("data") or {}
    tokenizer = load_tokenizer(data.get("tokenizer") or "bert-base-uncased")
    if run is not None:
        ctx = replace(task_context(run, tokenizer), seed=request.seed, eval_batches=request.max_batches)
        if request.synthetic:
            ctx = replace(ctx, data=replace(run.data, synthetic=True))
    else:
        mcfg = model.model_cfg
        ctx = TaskContext(
            tokenizer=tokenizer,
            cache_dir="",
            image_size=mcfg.image_size,
            max_text_len=mcfg.max_text_len,
            seed=request.seed,
            num_workers=0,
            data=DataConfig(
                train=[], synthetic=request.synthetic, tokenizer=data.get("tokenizer") or "bert-base-uncased"
            ),
            eval_batches=request.max_batches,
            image_mean=data.get("image_mean"),
            image_std=data.get("image_std"),
        )
    task = build_task(cfg, ctx)
    task.load_assets(config.get("task") or {})
    return task
