"""Validation: MSM metrics on held-out shards with fixed masks, and for the synthetic corpus the MLM
accuracy on attribute words next to the same accuracy with images shuffled across the batch
(`eve-evaluate`, eve_ds/cli/evaluate.py, runs it on a checkpoint)."""

from __future__ import annotations

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
    image_norm: tuple[list[float] | None, list[float] | None] = (None, None),
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
            batch = batch_to_device(batch, device, dtype, *image_norm)  # image_norm: (mean, std)
            b = batch["image"].shape[0]
            gen = torch.Generator(device=device).manual_seed(seed + 100_003 * rank + i)
            state = gen.get_state()
            out = model(batch, generator=gen)
            sums["n"] += b
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:  # every scalar the objectives report
                    sums[k] += float(v) * b
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
    if dist.is_initialized() and dist.get_world_size() > 1:  # a rank without batches has fewer keys
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
    totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    n = max(t.get("n", 0.0), 1.0)
    counters = {"n"} | {k for k in t if k.startswith("attr_")}
    metrics = {k: v / n for k, v in t.items() if k not in counters}
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
