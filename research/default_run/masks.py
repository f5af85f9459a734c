"""Which attribute words a pre-training run reads from the image, under different text masks.

    python -m research.default_run.masks runs/eve_tiny_synthetic --json masks.json

Fresh synthetic scenes (seeds disjoint from the corpus's), captioned as in training. Masks: `random50` (the
validation's masking: 50% of each caption's tokens) and `only_<category>` (only that category's words
masked, every other caption token visible: e.g. `only_relation` leaves both shapes' full descriptions in
view). Each is scored with the images and with the images rolled across the batch (the text-only control),
over all scenes and separately for the scenes with one, two and three shapes (`by_shapes`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from eve_ds.convert import load_init_weights
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import attribute_token_ids, caption, make_scene, render
from eve_ds.models.config import eve_tiny
from eve_ds.models.heads import MLMHead
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.masking import mask_text
from eve_ds.train.config import load_config
from eve_ds.train.run_dir import RunDir
from eve_ds.utils.image import normalize_image


def scenes_batch(
    n: int, image_size: int, tokenizer, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, text ids, text mask, number of shapes) of n fresh scenes."""
    scenes = [make_scene(np.random.default_rng([7, 77, i]), image_size) for i in range(n)]
    pixels = [
        np.asarray(render(s, np.random.default_rng([7, 78, i]), image_size)) for i, s in enumerate(scenes)
    ]
    images = normalize_image(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous())
    enc = tokenizer(
        [caption(s) for s in scenes],
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return images, enc["input_ids"], enc["attention_mask"], torch.tensor([len(s["shapes"]) for s in scenes])


def masked_batch(ids, text_mask, category, cats: dict, mask_id: int, generator):
    """(masked ids, masked positions): only `category`'s words, or 50% of each caption's tokens (the
    validation's masking) when category is None."""
    if category is None:
        return mask_text(ids, text_mask, 0.5, mask_id, generator)
    where = torch.isin(ids, cats[category])
    return ids.masked_fill(where, mask_id), where


@torch.no_grad()
def score(encoder, head, images, ids, text_mask, category, cats: dict, mask_id: int, bs: int = 128) -> dict:
    """{category: [accuracy, accuracy with images rolled, masked words]} with `masked_batch`'s masks (the
    random ones seeded per batch)."""
    counts = {c: [0, 0, 0] for c in cats}
    for s in range(0, len(ids), bs):
        t_ids, t_mask, img = ids[s : s + bs], text_mask[s : s + bs], images[s : s + bs]
        masked, mmask = masked_batch(t_ids, t_mask, category, cats, mask_id, torch.Generator().manual_seed(s))
        target = t_ids[mmask]
        pred = head(encoder(img, masked, t_mask).text[mmask]).argmax(-1)
        pred_rolled = head(encoder(img.roll(1, 0), masked, t_mask).text[mmask]).argmax(-1)
        for c, cid in cats.items():
            is_c = torch.isin(target, cid)
            counts[c][0] += int((pred == target)[is_c].sum())
            counts[c][1] += int((pred_rolled == target)[is_c].sum())
            counts[c][2] += int(is_c.sum())
    return {
        c: [round(h / max(n, 1), 3), round(hr / max(n, 1), 3), n] for c, (h, hr, n) in counts.items() if n
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="an eve_tiny pre-training run (or export) to load")
    p.add_argument("--num-scenes", type=int, default=1024)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = (
        load_config(str(RunDir(args.run_dir).config_path)).model
        if RunDir(args.run_dir).is_run()
        else eve_tiny()
    )
    tokenizer = load_tokenizer("bert-base-uncased")
    cats = {c: torch.tensor(v) for c, v in attribute_token_ids(tokenizer).items()}
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["mlm"]))
    load_init_weights(model, args.run_dir)
    model.eval()
    head = next(m for m in model.modules() if isinstance(m, MLMHead))
    *data, num_shapes = scenes_batch(args.num_scenes, cfg.image_size, tokenizer, cfg.max_text_len)
    modes = {"random50": None, **{f"only_{c}": c for c in cats}}  # mode -> masked category
    result, by_shapes = {}, {}
    for mode, category in modes.items():
        result[mode] = score(model.encoder, head, *data, category, cats, tokenizer.mask_token_id)
        print(mode, result[mode], flush=True)
    for n in (1, 2, 3):
        subset = [x[num_shapes == n] for x in data]
        by_shapes[n] = {
            m: score(model.encoder, head, *subset, c, cats, tokenizer.mask_token_id) for m, c in modes.items()
        }
        by_shapes[n] = {m: r for m, r in by_shapes[n].items() if r}  # one shape: no relation words
        print(f"{n} shape(s):", by_shapes[n], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            out = {
                "run_dir": args.run_dir,
                "num_scenes": args.num_scenes,
                "scores": result,
                "by_shapes": by_shapes,
            }
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
