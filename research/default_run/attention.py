"""Where the text tokens of an eve_tiny run look in the image: attention from caption words to the patches
of the shapes they are about.

    python -m research.default_run.attention runs/eve_tiny_synthetic --json attention.json

1,024 fresh synthetic scenes with two or three shapes. Two probes, each per block and head:

- *colour words* (full caption, nothing masked): of the attention a colour word pays to the image patches,
  the share on the patches its own shape covers, against the share a uniform look would give (the
  fraction of patches that shape covers);
- *masked relation word* (only the relation words masked, both shapes' descriptions visible): the share on
  the patches of the two shapes the relation is about, against the same uniform baseline.

Looking at shapes in general (the foreground) already beats the uniform baseline, so each probe also reports
the *selectivity*: attention per patch on the named shape(s) over attention per patch on the other shapes of
the scene (patches the named shapes do not touch), pooled over the words that have such other shapes. 1 = the
word looks at all shapes alike; a head that finds the shapes a word names is well above 1.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from eve_ds.convert import load_init_weights
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import ATTRIBUTE_WORDS, caption, make_scene, render
from eve_ds.models.layers import Attention
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.train.config import load_config
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.image import normalize_image


def patches_of(bbox: list[int], patch: int, grid: int) -> list[int]:
    """Grid indices of the patches a box (x0, y0, x1, y1), x1/y1 exclusive, overlaps."""
    x0, y0, x1, y1 = bbox
    cols = range(x0 // patch, (x1 - 1) // patch + 1)
    rows = range(y0 // patch, (y1 - 1) // patch + 1)
    return [r * grid + c for r in rows for c in cols]


def attention_maps(model: PretrainingModel, image, ids, mask) -> list[torch.Tensor]:
    """Softmax attention (B, H, N, N) of every block, recomputed from each block's own q, k and bias."""
    maps = []

    def hook(module: Attention, args, _out):
        x, tokens = args
        q, k, _ = module.heads(x)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        attn_bias = module.attn_bias(tokens, x.shape[1], q.dtype)
        if attn_bias is not None:
            logits = logits + attn_bias
        maps.append(logits.softmax(-1))

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            model.encoder(image, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--num-scenes", type=int, default=1024)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(str(RunDir(args.run_dir).config_path)).model
    tokenizer = load_tokenizer("bert-base-uncased")
    scenes = []
    i = 0
    while len(scenes) < args.num_scenes:
        s = make_scene(np.random.default_rng([11, 1, i]), cfg.image_size)
        if len(s["shapes"]) > 1:
            scenes.append((i, s))
        i += 1
    pixels = [np.asarray(render(s, np.random.default_rng([11, 2, i]), cfg.image_size)) for i, s in scenes]
    images = normalize_image(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous())
    scenes = [s for _, s in scenes]
    texts = [caption(s) for s in scenes]
    tok = tokenizer(
        texts, max_length=cfg.max_text_len, truncation=True, padding="longest", return_tensors="pt"
    )
    ids, mask = tok["input_ids"], tok["attention_mask"]
    colour_ids = dict(
        zip(tokenizer.convert_tokens_to_ids(ATTRIBUTE_WORDS["colour"]), ATTRIBUTE_WORDS["colour"])
    )
    relation_ids = set(tokenizer.convert_tokens_to_ids(ATTRIBUTE_WORDS["relation"]))
    masked = ids.clone()
    masked[torch.isin(ids, torch.tensor(sorted(relation_ids)))] = tokenizer.mask_token_id

    # (scene, text position, patch list) for every colour word and every relation word.
    colour_rows, relation_rows = [], []
    for b, s in enumerate(scenes):
        cover = [set(patches_of(sh["bbox"], cfg.patch_size, cfg.grid_size)) for sh in s["shapes"]]
        every = set().union(*cover)
        colour_of = {sh["colour"]: i for i, sh in enumerate(s["shapes"])}
        words = ids[b].tolist()
        for t, w in enumerate(words):
            if w in colour_ids:
                target = cover[colour_of[colour_ids[w]]]
                colour_rows.append((b, t, sorted(target), sorted(every - target)))
        rel_positions = [t for t, w in enumerate(words) if w in relation_ids]
        for r, t in zip(s["relations"], rel_positions):
            target = cover[r["subject"]] | cover[r["object"]]
            relation_rows.append((b, t, sorted(target), sorted(every - target)))

    result = {}
    for name, init in (("run", args.run_dir), ("random init", None)):
        torch.manual_seed(0)
        model = PretrainingModel(cfg, ObjectiveConfig(objectives=["mlm"]))
        if init:
            load_init_weights(model, init)
        model.eval()
        for probe, text_ids, rows in (
            ("colour word", ids, colour_rows),
            ("masked relation", masked, relation_rows),
        ):
            share, uniform = 0.0, 0.0
            per_patch = {"target": 0.0, "other": 0.0}  # summed attention per patch, over rows with others
            n_img = cfg.num_patches + 1
            for s0 in range(0, len(scenes), 128):
                maps = attention_maps(
                    model, images[s0 : s0 + 128], text_ids[s0 : s0 + 128], mask[s0 : s0 + 128]
                )
                att = torch.stack(maps, 1)  # (b, L, H, N, N)
                for b, t, target, other in rows:
                    if not s0 <= b < s0 + 128:
                        continue
                    a = att[b - s0, :, :, n_img + t, 1:n_img]  # (L, H, P) attention to the patches
                    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
                    share = share + a[..., target].sum(-1)
                    uniform += len(target) / cfg.num_patches
                    if other:
                        per_patch["target"] = per_patch["target"] + a[..., target].mean(-1)
                        per_patch["other"] = per_patch["other"] + a[..., other].mean(-1)
            key = f"{name} / {probe}"
            result[key] = {
                "on_target": [[round(v, 3) for v in layer] for layer in (share / len(rows)).tolist()],
                "uniform": round(uniform / len(rows), 3),
                "selectivity": [
                    [round(v, 2) for v in layer]
                    for layer in (per_patch["target"] / per_patch["other"]).tolist()
                ],
                "count": len(rows),
            }
            print(
                f"{key}: share on the named shape(s) (uniform {result[key]['uniform']}) | selectivity",
                flush=True,
            )
            for layer, (heads, sel) in enumerate(zip(result[key]["on_target"], result[key]["selectivity"])):
                print(
                    f"  block {layer}: "
                    + " ".join(f"{v:.2f}" for v in heads)
                    + " | "
                    + " ".join(f"{v:.1f}" for v in sel),
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run_dir": args.run_dir, "attention_share": result}, f, indent=1)


if __name__ == "__main__":
    main()
