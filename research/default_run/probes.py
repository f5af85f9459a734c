"""Linear probes on the image-patch outputs of an eve_tiny run: is a shape's kind, colour and grid position
readable from the patch that holds its centre?

    python -m research.default_run.probes runs/eve_tiny_synthetic --json probes.json

2,048 fresh synthetic scenes with their captions (no masking). For every shape, the feature is the output of
the patch containing its centre, taken (a) after the encoder's last block and (b) at its input (patch
embedding + position embedding); a linear softmax classifier is fitted on 70% of the shapes and scored on
the rest. The same for a randomly initialised model, as a reference.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from eve_ds.convert import load_init_weights
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import COLOURS, SHAPES, caption, make_scene, render
from eve_ds.models.config import eve_tiny
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.image import normalize_image


def linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax classifier fitted on the first 70% of (x, y)."""
    train = torch.arange(len(y)) < int(0.7 * len(y))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x[train] @ w + b, y[train]) + 1e-3 * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        return round(((x[~train] @ w + b).argmax(1) == y[~train]).float().mean().item(), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--num-scenes", type=int, default=2048)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, n = eve_tiny(), args.num_scenes
    tokenizer = load_tokenizer("bert-base-uncased")
    scenes = [make_scene(np.random.default_rng([9, 1, i]), cfg.image_size) for i in range(n)]
    pixels = [
        np.asarray(render(s, np.random.default_rng([9, 2, i]), cfg.image_size)) for i, s in enumerate(scenes)
    ]
    images = normalize_image(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous())
    text = tokenizer(
        [caption(s) for s in scenes], max_length=cfg.max_text_len, truncation=True, padding="max_length",
        return_tensors="pt",
    )  # fmt: skip
    rows = []  # (scene, patch of the centre, shape kind, colour)
    for i, s in enumerate(scenes):
        for shape in s["shapes"]:
            x0, y0, x1, y1 = shape["bbox"]
            patch = int((y0 + y1) / 2 // cfg.patch_size) * cfg.grid_size + int(
                (x0 + x1) / 2 // cfg.patch_size
            )
            rows.append((i, patch, SHAPES.index(shape["shape"]), list(COLOURS).index(shape["colour"])))
    rows_t = torch.tensor(rows)
    targets = {"shape": (rows_t[:, 2], len(SHAPES)), "colour": (rows_t[:, 3], len(COLOURS))}
    targets["position"] = (rows_t[:, 1], cfg.grid_size**2)
    result = {}
    for name, init in (("run", args.run_dir), ("random init", None)):
        model = PretrainingModel(cfg, ObjectiveConfig(objectives=["mlm"]))
        if init:
            load_init_weights(model, init)
        model.eval()
        top, inp = [], []
        with torch.no_grad():
            for s in range(0, n, 256):
                sl = slice(s, s + 256)
                top.append(
                    model.encoder(images[sl], text["input_ids"][sl], text["attention_mask"][sl]).image[:, 1:]
                )
                inp.append(model.encoder.embed_image(images[sl], None, None)[:, 1:])
        for layer, h in (("last block", torch.cat(top)), ("input", torch.cat(inp))):
            x = h[rows_t[:, 0], rows_t[:, 1]]
            result[f"{name} / {layer}"] = {k: linear_probe(x, y, c) for k, (y, c) in targets.items()}
            print(f"{name} / {layer}", result[f"{name} / {layer}"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run_dir": args.run_dir, "num_shapes": len(rows), "probes": result}, f, indent=1)


if __name__ == "__main__":
    main()
