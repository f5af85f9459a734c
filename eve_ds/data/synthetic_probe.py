"""The synthetic corpus's probe of whether a model reads the image: MLM accuracy on the masked attribute
words (colour, shape, size, position: `synthetic.ATTRIBUTE_WORDS`), next to the same accuracy with the
images rolled by one across the batch. The text alone cannot tell a caption's attributes, so a model that
reads its image scores well above the shuffled control.

Metrics: `attr_word_acc`, `attr_word_acc_shuffled_images`, `attr_words` (how many were scored), and each
per category (`attr_word_acc/colour`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eve_ds.data.config import DataConfig
from eve_ds.data.synthetic import attribute_token_ids

COUNTER_PREFIX = "attr_"  # the keys `update` sums: counts, not per-sample means


class AttributeProbe:
    """Counts, per validation batch, the masked attribute words the MLM head got right, with the batch's
    own images and with the images shuffled (same masks)."""

    def __init__(self, token_ids: dict[str, list[int]], device: str) -> None:
        self.categories = {c: torch.tensor(ids, device=device) for c, ids in token_ids.items()}
        self.suffixes = ("", *(f"/{c}" for c in self.categories))

    def zero(self) -> dict[str, float]:
        """Every counter at 0: each rank must sum the same keys, even one that gets no batch (the
        all-reduce of the counters is positional)."""
        keys = ("n", "hit", "hit_shuffled")
        return {f"{COUNTER_PREFIX}{k}{sfx}": 0.0 for k in keys for sfx in self.suffixes}

    def update(self, sums: dict[str, float], batch: dict, out: dict, rerun: Callable[[dict], dict]) -> None:
        """Add one batch's counts to `sums`. `rerun(batch)` runs the model again with the masks of `out`
        (the same generator state), here on the batch with its images rolled."""
        if "mlm_pred" not in out:
            return
        out_s = rerun(dict(batch, image=batch["image"].roll(1, 0)))
        hit = out["mlm_pred"] == out["mlm_target"]
        hit_s = out_s["mlm_pred"] == out_s["mlm_target"]
        for c, ids in self.categories.items():
            is_c = torch.isin(out["mlm_target"], ids)
            for suffix in ("", f"/{c}"):
                sums[COUNTER_PREFIX + "n" + suffix] += float(is_c.sum())
                sums[COUNTER_PREFIX + "hit" + suffix] += float(hit[is_c].sum())
                sums[COUNTER_PREFIX + "hit_shuffled" + suffix] += float(hit_s[is_c].sum())

    def metrics(self, totals: dict[str, float]) -> dict:
        """Accuracies from the counters summed over every batch and rank."""
        out = {}
        for suffix in self.suffixes:
            if "attr_n" + suffix in totals:
                n_attr = max(totals["attr_n" + suffix], 1.0)
                out["attr_word_acc" + suffix] = totals["attr_hit" + suffix] / n_attr
                out["attr_word_acc_shuffled_images" + suffix] = totals["attr_hit_shuffled" + suffix] / n_attr
                out["attr_words" + suffix] = int(totals["attr_n" + suffix])
        return out


def synthetic_probe(data: DataConfig | None, tokenizer, device: str) -> AttributeProbe | None:
    """The probe when the run trains on the synthetic corpus; None for other data."""
    if data is None or not data.synthetic:
        return None
    return AttributeProbe(attribute_token_ids(tokenizer), device)
