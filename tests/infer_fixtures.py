"""Tiny fine-tuned VQA / retrieval / NLVR2 runs (a few `eve-finetune` steps on the synthetic sets) shared
by the inference and explanation tests."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from eve_ds.cli.finetune import main as finetune

SETS = {
    "vqa": (
        "vqa_tiny_synthetic",
        {
            "task.synthetic_num_train": 40,
            "task.synthetic_num_val": 12,
            "task.synthetic_num_test": 6,
            "task.minival_images": 6,
        },
    ),
    "retrieval": (
        "retrieval_tiny_synthetic",
        {
            "task.synthetic_num_train": 40,
            "task.synthetic_num_val": 8,
            "task.synthetic_num_test": 6,
            "task.rerank_k": 10,  # every candidate of the 6 test images / 30 captions is re-ranked
        },
    ),
    "nlvr2": (
        "nlvr2_tiny_synthetic",
        {"task.synthetic_num_train": 32, "task.synthetic_num_val": 12, "task.synthetic_num_test": 8},
    ),
}


def tiny_run(task: str, root: Path, **overrides) -> tuple[Path, str]:
    """(run directory, the synthetic data set's folder) of a 2-step fine-tune under `root`; `overrides`:
    more config keys (dots as "__": task__image_geometry="official")."""
    config, extra = SETS[task]
    run, cache = root / task, root / "cache"
    base = {
        "data.cache_dir": cache,
        "train.init_from": "none",
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "data.num_workers": 0,
        **extra,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    }
    assert finetune(["--config", config, "--run-dir", str(run), *[f"{k}={v}" for k, v in base.items()]]) == 0
    prefix = {"vqa": "synthetic-vqa", "retrieval": "retrieval-coco", "nlvr2": "synthetic-nlvr2"}[task]
    (data,) = glob.glob(os.path.join(cache, f"{prefix}-*"))
    return run, data


def tiny_pretraining_run(root: Path) -> Path:
    """A 2-step `eve-pretrain` (MLM + pixel MIM) run on a small synthetic corpus under `root`."""
    from eve_ds.cli.pretrain import main as pretrain

    run = root / "msm"
    base = {
        "data.cache_dir": root / "cache",
        "data.synthetic_num_train": 64,
        "data.synthetic_num_val": 16,
        "data.num_workers": 0,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "train.log_every": 1,
        "optim.warmup_steps": 1,
    }
    assert pretrain(["--run-dir", str(run), *[f"{k}={v}" for k, v in base.items()]]) == 0
    return run
