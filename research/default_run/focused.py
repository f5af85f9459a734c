"""Learnability of each skill the default run needs: the default's encoder and MLM head trained on one
masked word at a time, in a plain PyTorch loop (MLM only, no MIM, one process).

    python -m research.default_run.focused --json focused.json                # every task
    python -m research.default_run.focused --tasks relation_two --steps 6000  # one task, longer

Every task draws its scenes with the corpus generator (`eve_ds.data.synthetic`), trains `eve_tiny` as the
default configures it (std 0.05, fixed sin-cos positions; AdamW at 1e-3, 100 warm-up steps, cosine to 0,
batch 32) and reports, on 1,024 held-out scenes, the accuracy on the masked word with the images and with the
images rolled across the batch (the text-only control). The tasks:

- `shape_one`: one-shape scenes, corpus caption, only the shape word masked -- shape *perception*;
- `shape_two`: two-shape scenes, corpus caption, only the shape words masked -- perception + *binding* (the
  word must find the shape whose colour and size the caption gives);
- `position_one`: one-shape scenes, caption "a <colour> left|right" (which half of the image holds the
  shape; not a corpus caption), that word masked -- reading where a shape is;
- `relation_two`: two-shape scenes, corpus caption, only the relation word masked -- comparing the
  positions of two named shapes;
- `relation_short`: two-shape scenes, caption "<colour> <relation> <colour>" (not a corpus caption), the
  relation masked -- the same comparison with the two names next to the masked word;
- `mixed`: the default's MLM -- the corpus's mix of one to three shapes, 50% of the caption masked, scored
  per attribute category as the trainer's validation scores it;
- `curriculum`: `mixed`, but the first 700 steps draw only one-shape scenes and steps 700-1,300 at most two;
- `attribute_masking`: `mixed`, but training masks attribute words 4x as likely as the other caption
  tokens (still 50% of each caption); validation masks as `mixed` does.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import attribute_token_ids, caption, make_scene, render
from eve_ds.models.config import eve_tiny
from eve_ds.models.eve import EVEModel
from eve_ds.models.heads import MLMHead
from eve_ds.objectives.masking import maskable_text_positions
from eve_ds.utils.image import normalize_image

from .attention import patches_of
from .masks import masked_batch, score

IMAGE_SIZE = 64
# task: (number of shapes per scene, 0 = the corpus's mix; caption style; masked word category, or None for
# 50% of the caption).
TASKS = {
    "shape_one": (1, "corpus", "shape"),
    "shape_two": (2, "corpus", "shape"),
    "position_one": (1, "position", "relation"),
    "relation_two": (2, "corpus", "relation"),
    "relation_short": (2, "short", "relation"),
    "mixed": (0, "corpus", None),
    "curriculum": (0, "corpus", None),
    "attribute_masking": (0, "corpus", None),
}
ATTRIBUTE_WEIGHT = 4.0  # attribute_masking: how much likelier an attribute word is to be masked in training
CURRICULUM = ((700, 1), (1300, 2))  # (last step, most shapes per scene) before the full mix


def describe(scene: dict, style: str) -> str:
    """The text of a scene: the corpus caption or one of the two diagnostic ones."""
    if style == "corpus":
        return caption(scene)
    if style == "position":
        shape = scene["shapes"][0]
        centre = (shape["bbox"][0] + shape["bbox"][2]) / 2
        return f"a {shape['colour']} {'left' if centre < IMAGE_SIZE / 2 else 'right'}"
    subject, obj = scene["shapes"][0]["colour"], scene["shapes"][1]["colour"]
    return f"{subject} {scene['relations'][0]['relation']} {obj}"


def make_split(tokenizer, seed: int, n: int, num_shapes: int, style: str) -> dict:
    """n scenes (only those with `num_shapes` shapes unless 0) as normalised images and tokenised texts."""
    images, texts, counts = [], [], []
    i = 0
    while len(images) < n:
        rng = np.random.default_rng([seed, i])
        i += 1
        scene = make_scene(rng, IMAGE_SIZE)
        if num_shapes and len(scene["shapes"]) != num_shapes:
            continue
        images.append(np.asarray(render(scene, rng, IMAGE_SIZE)))
        texts.append(describe(scene, style))
        counts.append(len(scene["shapes"]))
    enc = tokenizer(texts, max_length=40, truncation=True, padding="longest", return_tensors="pt")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return {
        "image": normalize_image(pixels),
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"],
        "shapes": torch.tensor(counts),
    }


def attribute_weighted_mask(ids, mask, cats, mask_id, generator, weight: float = ATTRIBUTE_WEIGHT):
    """50% of each caption's maskable tokens, drawn without replacement with attribute words `weight` times as
    likely as the others (Efraimidis-Spirakis keys u^(1/w))."""
    maskable = maskable_text_positions(mask)
    n_mask = torch.clamp(torch.round(maskable.sum(1, keepdim=True).float() * 0.5), min=1).long()
    w = torch.where(torch.isin(ids, torch.cat(list(cats.values()))), weight, 1.0)
    key = (torch.rand(ids.shape, generator=generator).log() / w).masked_fill(~maskable, -float("inf"))
    where = (key.argsort(1, descending=True).argsort(1) < n_mask) & maskable
    return ids.masked_fill(where, mask_id), where


def sincos_1d(dim: int, length: int, base: float = 100.0) -> torch.Tensor:
    """(length, dim) [sin | cos] of position * base^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
    pos = torch.arange(length).float()[:, None]
    omega = 1.0 / base ** (torch.arange(dim // 2).float() / (dim // 2))
    return torch.cat([(pos * omega).sin(), (pos * omega).cos()], dim=1)


def grid_orders_relations(num_scenes: int = 3000, patch: int = 16, seed: int = 5) -> tuple[int, float]:
    """(relations, share of them) whose two shapes are put in the right order along the relation's axis by
    the mean grid position of the patches each shape touches: can the 4 x 4 patch grid express them?"""
    grid, right, total = IMAGE_SIZE // patch, 0, 0
    for i in range(num_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), IMAGE_SIZE)
        for r in scene["relations"]:
            axis = 0 if r["relation"] in ("left", "right") else 1
            centre = [
                np.mean(
                    [(p % grid, p // grid)[axis] for p in patches_of(scene["shapes"][k]["bbox"], patch, grid)]
                )
                for k in (r["subject"], r["object"])
            ]
            sign = -1 if r["relation"] in ("left", "above") else 1
            right += bool(np.sign(centre[0] - centre[1]) == sign)
            total += 1
    return total, right / total


def run_task(
    name: str,
    steps: int,
    eval_every: int,
    num_train: int,
    tokenizer,
    cats,
    seed: int = 0,
    num_val: int = 1024,
    model_overrides: dict | None = None,
    text_sincos: bool = False,
) -> list:
    """Train one task from scratch; its validation curve [{step, seconds, scores}]."""
    num_shapes, style, category = TASKS[name]
    train = make_split(tokenizer, seed * 2 + 1, num_train, num_shapes, style)
    val = make_split(tokenizer, seed * 2 + 2, num_val, num_shapes, style)
    torch.manual_seed(seed)
    # As eve_tiny_synthetic configures it, unless overridden.
    cfg = eve_tiny(**{"init_std": 0.05, "pos_embed": "sincos", **(model_overrides or {})})
    encoder, head = EVEModel(cfg), MLMHead(cfg)
    if text_sincos:  # a variant for the relation question: fixed 1-D sin-cos text positions
        with torch.no_grad():
            encoder.text_pos_embed[0] = sincos_1d(cfg.hidden_size, cfg.max_text_len)
        encoder.text_pos_embed.requires_grad_(False)
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=True)
    pools = {k: torch.nonzero(train["shapes"] <= k)[:, 0] for k in (1, 2, 3)}
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.time()
    for step in range(1, steps + 1):
        lr = 1e-3 * min(step / 100, 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        most = next((k for last, k in CURRICULUM if step <= last), 3) if name == "curriculum" else 3
        idx = pools[most][torch.randint(0, len(pools[most]), (32,), generator=gen)]
        mask = train["mask"][idx]
        length = int(mask.sum(1).max())
        ids, mask = train["ids"][idx, :length], mask[:, :length]
        if name == "attribute_masking":
            inputs, where = attribute_weighted_mask(ids, mask, cats, tokenizer.mask_token_id, gen)
        else:
            inputs, where = masked_batch(ids, mask, category, cats, tokenizer.mask_token_id, gen)
        out = encoder(train["image"][idx], inputs, mask)
        loss = F.cross_entropy(head(out.text[where]), ids[where]) + 0.001 * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            encoder.eval()
            scores = score(
                encoder,
                head,
                val["image"],
                val["ids"],
                val["mask"],
                category,
                cats,
                tokenizer.mask_token_id,
                256,
            )
            encoder.train()
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "scores": scores})
            text = "  ".join(f"{c} {a:.3f} ({r:.3f})" for c, (a, r, _) in scores.items())
            print(f"{name} step {step}: {text}", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=2200, help="steps per task (the default run's 2,200)")
    p.add_argument("--eval-every", type=int, default=275)
    p.add_argument("--num-train", type=int, default=20000, help="training scenes per task (the corpus's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--model", nargs="*", default=[], metavar="KEY=VALUE", help="eve_tiny overrides, e.g. num_layers=6"
    )
    p.add_argument("--text-sincos", action="store_true", help="fixed 1-D sin-cos text positions (a variant)")
    p.add_argument(
        "--grid-check", action="store_true", help="only check that the patch grid orders relations"
    )
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.model)}
    torch.set_num_threads(args.threads)
    if args.grid_check:
        total, share = grid_orders_relations()
        print(
            f"{total} relations of 3,000 scenes, ordered right by the patches' mean grid position: {share:.4f}"
        )
        return
    tokenizer = load_tokenizer("bert-base-uncased")
    cats = {c: torch.tensor(v) for c, v in attribute_token_ids(tokenizer).items()}
    result = {
        "steps": args.steps,
        "num_train": args.num_train,
        "seed": args.seed,
        "model_overrides": overrides,
        "text_sincos": args.text_sincos,
        "tasks": {},
    }
    for name in args.tasks:
        result["tasks"][name] = run_task(
            name,
            args.steps,
            args.eval_every,
            args.num_train,
            tokenizer,
            cats,
            args.seed,
            1024,
            overrides,
            args.text_sincos,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
