"""`eve-evaluate`: validation metrics of a checkpoint (run dir, DeepSpeed tag dir or native export).

eve-evaluate --checkpoint RUN_DIR|TAG_DIR|EXPORT_DIR --data SHARDS [--json]
"""

from __future__ import annotations

import argparse
import json

from eve_ds.convert import load_pretraining_model
from eve_ds.data import build_val_loader, load_tokenizer
from eve_ds.data.config import DataConfig
from eve_ds.train.distributed import resolve_device
from eve_ds.train.metrics import setup_logging
from eve_ds.train.validation import attribute_ids_if_synthetic, evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed tag dir or native export dir")
    p.add_argument("--data", required=True, help="brace-expanded validation shard spec")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole set")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="also report attribute-word accuracy (synthetic corpus); default: from the config",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    setup_logging(0)
    device = resolve_device(args.device)
    model, config = load_pretraining_model(args.checkpoint, device=device)
    run = config.get("run") or {}
    data_cfg = run.get("data") or {}
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
    metrics = evaluate(
        model, loader, device=device, seed=args.seed, max_batches=args.max_batches, attr_token_ids=attr_ids
    )
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        for k, v in metrics.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
