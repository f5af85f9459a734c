"""Is VQA Grad-CAM falsifiable? Heat inside the asked-about object's box, real vs shuffled images.

    python -m research.gradcam_box --out research/results/gradcam-box.json

Fine-tunes `vqa_tiny_synthetic` from scratch for `--steps` steps (skipped when `--run-dir` already has a
checkpoint), then for every object of every test-split scene asks "what color is the <shape>?" and
computes the answer's Grad-CAM (`eve_ds.infer.attribution.vqa_heat`, the predicted answer, the default
layer) over the patch grid. The scene metadata (`eve_ds.tasks.vqa.synthetic.synthetic_image`, the same
pure function that drew the images) gives the object's box.

heat_in_box = sum over patches of heat x (fraction of the patch inside the box) / sum of heat
box_share   = sum over patches of (fraction of the patch inside the box) / number of patches
(box_share is what a heat map spread evenly, or placed without regard to the object, would get.)

Control: the same questions and boxes with each question's image replaced by another test scene's
(a random permutation without fixed points): the heat can then know nothing of the box.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eve_ds.cli.finetune import main as finetune
from eve_ds.infer import VQAPredictor
from eve_ds.infer import preprocess as pre
from eve_ds.infer.attribution import default_layer, vqa_heat
from eve_ds.tasks.vqa.synthetic import ID_BASE, image_path, synthetic_image


def train(run: Path, cache: Path, steps: int, num_train: int, batch_size: int) -> float:
    """Fine-tune from scratch unless `run` has a checkpoint; -> seconds it took (0 when skipped)."""
    if (run / "checkpoints").is_dir():
        return 0.0
    overrides = {
        "data.cache_dir": cache,
        "data.num_workers": 0,
        "train.init_from": "none",
        "train.max_steps": steps,
        "train.global_batch_size": batch_size,
        "train.micro_batch_size": batch_size,
        "train.checkpoint_every": steps,
        "train.log_every": 50,
        "task.synthetic_num_train": num_train,
        "task.synthetic_num_val": 40,
        "task.synthetic_num_test": 100,
        "task.minival_images": 20,
    }
    t0 = time.perf_counter()
    argv = ["--config", "vqa_tiny_synthetic", "--run-dir", str(run)]
    assert finetune([*argv, *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    return time.perf_counter() - t0


def box_cover(bbox: list[float], grid: int, image_size: int) -> np.ndarray:
    """(G, G): the fraction of each patch's area inside the box (x0, y0, x1, y1) in pixels."""
    p = image_size / grid
    edges = np.arange(grid + 1) * p
    x0, y0, x1, y1 = bbox
    ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None) / p  # (G,) columns
    oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None) / p  # (G,) rows
    return oy[:, None] * ox[None, :]


def colour_items(root: str, seed: int, num_images: int, image_size: int) -> list[dict]:
    """One item per object of each test scene: image path, question, true colour, box."""
    items = []
    for index in range(num_images):
        scene, _, _ = synthetic_image(seed, "test", index, image_size)
        path = image_path(root, "test", ID_BASE["test"] + index)
        shapes = [s["shape"] for s in scene["shapes"]]
        for s in scene["shapes"]:
            if shapes.count(s["shape"]) == 1:  # the question names one object
                q = f"what color is the {s['shape']}?"
                items.append(
                    {"scene": index, "path": path, "question": q, "colour": s["colour"], "bbox": s["bbox"]}
                )
    return items


def measure(vqa: VQAPredictor, items: list[dict], paths: list[str], layer: int) -> dict:
    """Mean heat_in_box, box_share and answer accuracy of `items`, asked on the images `paths`."""
    grid, size = vqa.model.model_cfg.grid_size, vqa.model.model_cfg.image_size
    inside, share, correct = [], [], []
    for item, path in zip(items, paths):
        batch, bad = pre.vqa_batch([path], [item["question"]], vqa.vocab, vqa.ctx)
        assert not bad, path
        heat = vqa_heat(vqa, batch, None, layer)
        h = heat.heatmap.numpy().astype(np.float64)
        cover = box_cover(item["bbox"], grid, size)
        inside.append(float((h * cover).sum() / max(h.sum(), 1e-12)))
        share.append(float(cover.mean()))
        correct.append(heat.label == item["colour"])
    return {
        "heat_in_box": float(np.mean(inside)),
        "box_share": float(np.mean(share)),
        "ratio": float(np.mean(inside) / np.mean(share)),
        "frac_questions_above_share": float(np.mean(np.array(inside) > np.array(share))),
        "answer_accuracy": float(np.mean(correct)),
        "num_questions": len(items),
    }


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/gradcam_box"))
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-train", type=int, default=1500, help="synthetic training images (5 questions each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds = train(args.run_dir, args.cache_dir, args.steps, args.num_train, args.batch_size)
    vqa = VQAPredictor.from_pretrained(args.run_dir)
    (root,) = glob.glob(
        os.path.join(args.cache_dir, f"synthetic-vqa-*-train{args.num_train}-val40-test100-*")
    )
    layer = default_layer(vqa.model.model_cfg.num_layers)
    scenes = colour_items(root, seed=0, num_images=100, image_size=vqa.model.model_cfg.image_size)
    perm = derangement(100, np.random.default_rng(0))
    shuffled_paths = [image_path(root, "test", ID_BASE["test"] + int(perm[it["scene"]])) for it in scenes]
    result = {
        "command": "python -m research.gradcam_box " + " ".join(sys.argv[1:] if argv is None else argv),
        "finetune": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "num_train_images": args.num_train,
            "seconds": round(seconds, 1),
        },
        "layer": layer,
        "grid": vqa.model.model_cfg.grid_size,
        "real": measure(vqa, scenes, [it["path"] for it in scenes], layer),
        "shuffled": measure(vqa, scenes, shuffled_paths, layer),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
