"""Is VQA Grad-CAM falsifiable? Heat inside the asked-about object's box, real vs shuffled images.

    eve-pretrain --run-dir runs/eve_tiny_synthetic                       # the default pre-training run
    eve-finetune --config vqa_tiny_synthetic --run-dir runs/vqa_tiny_synthetic \\
        train.init_from=runs/eve_tiny_synthetic
    python -m research.gradcam_box --run-dir runs/vqa_tiny_synthetic \\
        --out research/results/gradcam-box-pretrained.json

(`--run-dir` without a checkpoint: fine-tunes there first, from `--init`, for `--steps` steps at batch 16.)
research/results/gradcam-box-pretrained.json was measured so, on CPU (the default runs, 2200 + 1032 steps):

    cd /tmp/defrun && eve-pretrain                      # -> /tmp/defrun/runs/eve_tiny_synthetic
    cd /tmp/hb_run && OMP_NUM_THREADS=1 eve-finetune --config vqa_tiny_synthetic \\
        train.init_from=/tmp/defrun/runs/eve_tiny_synthetic data.cache_dir=/tmp/hb_run/cache
    python -m research.gradcam_box --run-dir /tmp/hb_run/runs/vqa_tiny_synthetic \\
        --out research/results/gradcam-box-pretrained.json

Questions: "what color is the <shape>?" about every object of the synthetic VQA test scenes (each shape
appears at most once in a scene, so the question names one object). The scenes are redrawn here from
`eve_ds.tasks.vqa.synthetic.synthetic_image` (the pure function that drew the data set, JPEG-encoded as
its writer does), with the scene metadata giving each object's box; scenes `--select` (100 from index
1000) choose the map's quantity, scenes 0 to `--scenes` - 1 report it, so the choice is not made on the
numbers reported.

The maps: one backward of the explained answer's logit (the predicted one, as `eve-explain` does) with the
attention probabilities A_l kept at every block l, and C_l = mean over heads of A_l * max(dA_l, 0)
(ALBEF's Grad-CAM) read at the text [CLS] query row -> patch keys (`cls/l`), at the mean of the question's
token rows (`question/l`), averaged over blocks (`cls/mean`), and rolled out over the blocks as Chefer et
al. (2021) do for self-attention (`rollout`: R = I, R <- R + C_l R from the first block to the last, the
[CLS] row of R).

heat_in_box = sum over patches of heat x (fraction of the patch inside the box) / sum of heat
box_share   = sum over patches of (fraction of the patch inside the box) / number of patches
(box_share is what a map spread evenly, or placed without regard to the object, gets in expectation;
best_possible: all heat on the patch most covered by the box.) pointing: the hottest patch overlaps the
box; its chance: the share of patches that overlap it.

Control (`shuffled`): every question and box with its image replaced by another scene's (a random
permutation without fixed points, i.e. another image of the batch with the same question): the heat
can then know nothing of the box.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eve_ds.cli.finetune import main as finetune
from eve_ds.infer import VQAPredictor
from eve_ds.infer import preprocess as pre
from eve_ds.infer.attribution import gradcam, keep_attention
from eve_ds.tasks.vqa.synthetic import synthetic_image

SELECT_FROM = 1000  # the selection scenes' first index: apart from the reported ones


def train(run: Path, cache: Path, init: str, steps: int) -> float:
    """Fine-tune `vqa_tiny_synthetic` into `run` unless it has a checkpoint; -> seconds (0 when skipped)."""
    if (run / "checkpoints").is_dir():
        return 0.0
    overrides = {
        "data.cache_dir": cache,
        "data.num_workers": 0,
        "train.init_from": init,
        "train.max_steps": steps,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 16,
        "train.checkpoint_every": steps,
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


def colour_items(folder: str, seed: int, scenes: range, image_size: int) -> list[dict]:
    """One item per object of each scene (drawn, saved into `folder`): image, question, colour, box."""
    items = []
    for index in scenes:
        scene, image, _ = synthetic_image(seed, "test", index, image_size)
        path = os.path.join(folder, f"{index}.jpg")
        image.save(path, format="JPEG", quality=95, subsampling=0)  # as the data set's writer saves it
        for s in scene["shapes"]:
            others = [o["bbox"] for o in scene["shapes"] if o is not s]
            q = f"what color is the {s['shape']}?"
            items.append(
                {
                    "scene": index,
                    "path": path,
                    "question": q,
                    "colour": s["colour"],
                    "bbox": s["bbox"],
                    "others": others,
                }
            )
    return items


def heat_variants(vqa: VQAPredictor, batch: dict) -> tuple[str, dict[str, np.ndarray]]:
    """The predicted answer of one question and its maps, each (G, G) over the patch grid."""
    model, grid = vqa.model, vqa.model.model_cfg.grid_size
    inputs = vqa.text_inputs(batch)
    blocks = range(len(model.encoder.blocks))
    with torch.enable_grad(), keep_attention(model.encoder, blocks) as attns:
        enc = model.encoder(inputs["image"], inputs["text_ids"], inputs["text_mask"])
        logits = model.objectives["vqa"].head(enc.hidden[:, enc.n_image]).float()[0]  # (A,)
        a = int(logits.argmax())
        model.zero_grad(set_to_none=True)
        logits[a].backward()
        cams = [gradcam(attn.kept_attn)[0].detach().double() for attn in attns]  # each (N, N)
    n, n_text = enc.n_image, int(batch["text_mask"][0].sum())
    maps = {}
    for layer, cam in zip(blocks, cams):
        maps[f"cls/{layer}"] = cam[n, 1:n]
        maps[f"question/{layer}"] = cam[n : n + n_text, 1:n].mean(0)
    maps["cls/mean"] = torch.stack([cam[n, 1:n] for cam in cams]).mean(0)
    rollout = torch.eye(cams[0].shape[0], dtype=torch.float64)
    for cam in cams:
        rollout = rollout + cam @ rollout
    maps["rollout"] = rollout[n, 1:n]
    return vqa.vocab.answer(a), {k: v.reshape(grid, grid).numpy() for k, v in maps.items()}


def run_questions(vqa: VQAPredictor, items: list[dict], paths: list[str]) -> list[dict]:
    """Per question (asked on the image `paths[i]`): predicted answer, maps, box cover (G, G)."""
    grid, size = vqa.model.model_cfg.grid_size, vqa.model.model_cfg.image_size
    out = []
    for item, path in zip(items, paths):
        batch, bad = pre.vqa_batch([path], [item["question"]], vqa.vocab, vqa.ctx, vqa.geometry)
        assert not bad, path
        answer, maps = heat_variants(vqa, batch)
        others = np.zeros((grid, grid))
        for bbox in item["others"]:
            others += box_cover(bbox, grid, size)  # the scene's objects do not overlap
        cover = box_cover(item["bbox"], grid, size)
        out.append(
            {
                "scene": item["scene"],
                "correct": answer == item["colour"],
                "maps": maps,
                "cover": cover,
                "others": others,
            }
        )
    return out


def summarise(rows: list[dict], variant: str) -> dict:
    """Means over `rows` of heat_in_box, box_share, pointing and their ratios, for one map variant."""
    if not rows:
        return {"num_questions": 0}
    inside, share, best, hit, hit_chance = [], [], [], [], []
    for r in rows:
        h, c = np.clip(r["maps"][variant], 0, None), r["cover"]
        inside.append(float((h * c).sum() / max(h.sum(), 1e-30)))
        share.append(float(c.mean()))
        best.append(float(c.max()))
        hit.append(float(c.reshape(-1)[h.argmax()] > 0))
        hit_chance.append(float((c > 0).mean()))
    heat = np.stack([np.clip(r["maps"][variant], 0, None).reshape(-1) for r in rows])  # (n, G*G)
    heat = heat / np.clip(heat.sum(1, keepdims=True), 1e-30, None)
    cover = np.stack([r["cover"].reshape(-1) for r in rows])
    others = np.stack([r["others"].reshape(-1) for r in rows])
    scene = np.array([r["scene"] for r in rows])
    apart = scene[:, None] != scene[None, :]  # pairs of different scenes
    return {
        "num_questions": len(rows),
        "heat_in_box": float(np.mean(inside)),
        # the same maps against the boxes of every other scene's questions: what a map placed without
        # regard to the box gets, its own spatial bias (e.g. towards the centre) included
        "chance_other_scenes_boxes": float((heat @ cover.T)[apart].mean()) if apart.any() else None,
        "box_share": float(np.mean(share)),
        "ratio": float(np.mean(inside) / np.mean(share)),
        "frac_questions_above_share": float(np.mean(np.array(inside) > np.array(share))),
        "best_possible": float(np.mean(best)),
        # the scene's other objects: a map that lights every object, not the one asked about, gets as much
        "heat_in_other_objects": float((heat * others).sum(1).mean()),
        "other_objects_share": float(others.mean()),
        "pointing": float(np.mean(hit)),
        "pointing_chance": float(np.mean(hit_chance)),
    }


def report(rows: list[dict], variant: str) -> dict:
    """summarise() of all rows and split by whether the model answered right, plus the accuracy."""
    right = [r for r in rows if r["correct"]]
    wrong = [r for r in rows if not r["correct"]]
    return {
        **summarise(rows, variant),
        "answer_accuracy": len(right) / len(rows),
        "answered_right": summarise(right, variant),
        "answered_wrong": summarise(wrong, variant),
    }


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="only to fine-tune")
    p.add_argument("--init", default="runs/eve_tiny_synthetic", help="only to fine-tune; none = scratch")
    p.add_argument("--steps", type=int, default=500, help="only to fine-tune")
    p.add_argument("--scenes", type=int, default=200, help="test scenes 0 .. N-1 reported")
    p.add_argument("--select", type=int, default=100, help="scenes choosing the variant (from 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds = train(args.run_dir, args.cache_dir, args.init, args.steps)
    vqa = VQAPredictor.from_pretrained(args.run_dir)
    cfg, seed = vqa.model.model_cfg, pre.task_config(vqa.config, "vqa").synthetic_seed
    with tempfile.TemporaryDirectory(prefix="gradcam-box-") as tmp:
        shown = colour_items(tmp, seed, range(args.scenes), cfg.image_size)
        chooser = colour_items(tmp, seed, range(SELECT_FROM, SELECT_FROM + args.select), cfg.image_size)
        perm = derangement(args.scenes, np.random.default_rng(0))
        other = [os.path.join(tmp, f"{int(perm[it['scene']])}.jpg") for it in shown]
        select = run_questions(vqa, chooser, [it["path"] for it in chooser])
        real = run_questions(vqa, shown, [it["path"] for it in shown])
        shuffled = run_questions(vqa, shown, other)
    variants = list(real[0]["maps"])
    ratios = {v: summarise(select, v)["ratio"] for v in variants}
    chosen = max(ratios, key=ratios.get)
    result = {
        "command": "python -m research.gradcam_box " + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": str(args.run_dir),
        "finetune_seconds": round(seconds, 1),
        "grid": cfg.grid_size,
        "image_size": cfg.image_size,
        "geometry": vqa.geometry,
        "selection": {"scenes": [SELECT_FROM, SELECT_FROM + args.select], "ratio_real": ratios},
        "chosen": chosen,
        "scenes": [0, args.scenes],
        "real": report(real, chosen),
        "shuffled": report(shuffled, chosen),
        "all_variants": {
            v: {"real": summarise(real, v), "shuffled": summarise(shuffled, v)} for v in variants
        },
    }
    print(json.dumps({k: result[k] for k in ("chosen", "real", "shuffled")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
