"""Validation: MSM metrics on held-out shards with fixed masks, and for the synthetic corpus the MLM
accuracy on attribute words next to the same accuracy with images shuffled across the batch.

    eve-evaluate --checkpoint RUN_DIR|TAG_DIR|EXPORT_DIR --data SHARDS [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict

import torch
import torch.distributed as dist

from eve_ds.data.transforms import batch_to_device

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model,
    loader,
    *,
    device: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    max_batches: int = 0,
    attr_token_ids: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Mean MSM metrics over `loader` (all ranks together when distributed).

    Masks come from a generator seeded per batch, so every call (and every checkpoint) sees the same
    masks. With `attr_token_ids` ({category: token ids}), also `attr_word_acc` (MLM accuracy on masked
    attribute words), `attr_word_acc_shuffled_images` (same masks, images rolled by one across the batch:
    the text has to be predicted without its image — the control that shows the model reads the image)
    and both per category (`attr_word_acc/colour`, `attr_word_acc_shuffled_images/colour`, ...).
    """
    was_training = model.training
    model.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    sums: dict[str, float] = defaultdict(float)
    categories = {c: torch.tensor(ids, device=device) for c, ids in (attr_token_ids or {}).items()}
    # Every rank sums the same keys, even one that gets no batch (the all-reduce below is positional).
    suffixes = ("", *(f"/{c}" for c in categories)) if categories else ()
    for key in ("n", *(f"attr_{k}{sfx}" for k in ("n", "hit", "hit_shuffled") for sfx in suffixes)):
        sums[key] += 0.0
    # fork_rng: evaluation must not move the training RNG streams (exact resume).
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = batch_to_device(batch, device, dtype)
            b = batch["image"].shape[0]
            gen = torch.Generator(device=device).manual_seed(seed + 100_003 * rank + i)
            state = gen.get_state()
            out = model(batch, generator=gen)
            sums["n"] += b
            for k in ("loss", "mlm_loss", "mim_loss", "aux_loss", "mlm_acc"):
                if k in out:
                    sums[k] += float(out[k]) * b
            if categories and "mlm_pred" in out:
                gen.set_state(state)
                shuffled = dict(batch, image=batch["image"].roll(1, 0))
                out_s = model(shuffled, generator=gen)
                hit = out["mlm_pred"] == out["mlm_target"]
                hit_s = out_s["mlm_pred"] == out_s["mlm_target"]
                for c, ids in categories.items():
                    is_c = torch.isin(out["mlm_target"], ids)
                    for suffix in ("", f"/{c}"):
                        sums["attr_n" + suffix] += float(is_c.sum())
                        sums["attr_hit" + suffix] += float(hit[is_c].sum())
                        sums["attr_hit_shuffled" + suffix] += float(hit_s[is_c].sum())
    model.train(was_training)
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    n = max(t.get("n", 0.0), 1.0)
    metrics = {k: t[k] / n for k in ("loss", "mlm_loss", "mim_loss", "aux_loss", "mlm_acc") if k in t}
    metrics["num_samples"] = int(t.get("n", 0))
    for suffix in suffixes:
        if "attr_n" + suffix in t:
            n_attr = max(t["attr_n" + suffix], 1.0)
            metrics["attr_word_acc" + suffix] = t["attr_hit" + suffix] / n_attr
            metrics["attr_word_acc_shuffled_images" + suffix] = t["attr_hit_shuffled" + suffix] / n_attr
            metrics["attr_words" + suffix] = int(t["attr_n" + suffix])
    return metrics


def attribute_ids_if_synthetic(data_cfg, tokenizer) -> dict[str, list[int]] | None:
    """{category: token ids} of the synthetic corpus's attribute words, or None for other data."""
    if not data_cfg.synthetic:
        return None
    from eve_ds.data.synthetic import attribute_token_ids

    return attribute_token_ids(tokenizer)


def main(argv: list[str] | None = None) -> int:
    from eve_ds.convert import load_pretraining_model
    from eve_ds.data import build_val_loader, load_tokenizer
    from eve_ds.data.config import DataConfig
    from eve_ds.train.metrics import setup_logging

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
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
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
