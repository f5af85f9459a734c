"""`eve-evaluate`: validation metrics of a checkpoint (run dir, DeepSpeed tag dir or native export).

eve-evaluate --checkpoint RUN_DIR|TAG_DIR|EXPORT_DIR --data SHARDS [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from eve_ds.convert import load_pretraining_model
from eve_ds.data import build_val_loader, load_tokenizer
from eve_ds.data.config import DataConfig
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.task import TaskContext, build_task
from eve_ds.train.distributed import resolve_device
from eve_ds.train.metrics import setup_logging
from eve_ds.train.validation import attribute_ids_if_synthetic, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed tag dir or native export dir")
    p.add_argument("--task", choices=["msm", "vqa", "retrieval", "nlvr2"], default="msm")
    p.add_argument("--data", help="msm: validation shards (a shard directory or brace spec)")
    p.add_argument("--data-root", help="downstream task: the dataset's files as distributed")
    p.add_argument("--split", help="vqa: val | test-dev | test; retrieval: val | test; nlvr2: dev | test1")
    p.add_argument("--dataset", default=None, choices=["coco", "flickr30k"], help="retrieval")
    p.add_argument("--rerank-k", type=int, default=None, help="retrieval: ITC top-k re-scored by ITM")
    p.add_argument("--predictions", help="vqa: write the EvalAI file [{question_id, answer}] here")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable evaluation images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="msm: 0 = the whole set")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="msm: also report attribute-word accuracy (synthetic corpus); default: from the config",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.task == "msm" and not args.data:
        p.error("--data is required for pre-training validation (--task msm)")
    if args.task != "msm" and not (args.data_root and args.split):
        p.error(f"--task {args.task} needs --data-root and --split")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)
    device = resolve_device(args.device)
    model, config = load_pretraining_model(args.checkpoint, device=device)
    if args.task == "msm":
        metrics = msm_metrics(model, config, args, device)
    else:
        try:
            metrics = task_metrics(model, config, args, device)
        except (ValueError, FileNotFoundError) as e:
            print(f"eve-evaluate: error: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        for k, v in metrics.items():
            print(f"{k:32s} {v}")
    return 0


def msm_metrics(model, config: dict, args: argparse.Namespace, device: str) -> dict:
    data_cfg = (config.get("run") or {}).get("data") or {}
    tokenizer = load_tokenizer(data_cfg.get("tokenizer", "bert-base-uncased"))
    synthetic = args.synthetic or bool(data_cfg.get("synthetic", False))
    attr_ids = (
        attribute_ids_if_synthetic(DataConfig(train=[], synthetic=True), tokenizer) if synthetic else None
    )
    mcfg = model.model_cfg
    loader = build_val_loader(
        args.data,
        image_size=mcfg.image_size,
        max_text_len=mcfg.max_text_len,
        batch_size=args.batch_size,
        tokenizer=tokenizer,
    )
    return evaluate(
        model, loader, device=device, seed=args.seed, max_batches=args.max_batches, attr_token_ids=attr_ids
    )


def task_metrics(model, config: dict, args: argparse.Namespace, device: str) -> dict:
    """A downstream task's metrics on `args.split` of the files under `args.data_root`."""
    run = config.get("run") or {}
    saved = (run.get("task") or {}) | {"name": args.task, "data_root": args.data_root, "synthetic": False}
    if args.dataset:
        saved["dataset"] = args.dataset
    if args.rerank_k:
        saved["rerank_k"] = args.rerank_k
    saved["skip_bad_eval_images"] = args.skip_bad_images
    cfg = TaskConfig(**{k: v for k, v in saved.items() if k in TaskConfig.__dataclass_fields__})
    mcfg = model.model_cfg
    ctx = TaskContext(
        tokenizer=load_tokenizer(((run.get("data") or {}).get("tokenizer")) or "bert-base-uncased"),
        cache_dir="",
        image_size=mcfg.image_size,
        max_text_len=mcfg.max_text_len,
        num_workers=0,
    )
    task = build_task(cfg, ctx)
    task.load_assets(config.get("task") or {})
    return task.evaluate_split(
        model, args.split, device=device, batch_size=args.batch_size, predictions=args.predictions
    )


if __name__ == "__main__":
    raise SystemExit(main())
