"""Why POPE can sit at chance in the tiny EVLM runs: the yes / no balance of the training rows, and what the
stage-0 LM (RUN/lm, text only) answers to the evaluation's POPE questions before any image is read.

    python benchmarks/evlm_pope_probe.py --lm runs/evlm_tiny_synthetic/lm --rows 24000 --json OUT.json \
        --run runs/evlm_tiny_synthetic          # optional: a trained run, read as eve-evaluate reads it

Rows: the first `--rows` training scenes of `evlm_synthetic` (750 steps x 32 rows = 24,000 is what the
tiny run reads), counted by kind (pope, and the yes/no VQA templates exists and relation) and answer.
LM: P(yes) / (P(yes) + P(no)) at the answer position of every POPE prompt of the 300 validation scenes,
for the questions whose answer is yes and those whose answer is no (equal means: no text prior leaks).
Run (optional): the trained model's greedy yes-ratio on the POPE and `exists` questions of the validation
scenes, by answer and by whether the colour the question names is in the image. A model that reads the
question against the image says "yes" far more often when the colour is there.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from eve_ds.data.synthetic import make_scene
from eve_ds.tasks.evlm_synthetic.data import VOCAB, CaptionScenes, ensure_tokenizer
from eve_ds.tasks.evlm_synthetic.eval import eval_rng, scene_prompts

RELATION_WORDS = {"left", "right", "above", "below"}


TOKENIZER = "data/evlm_synthetic/tokenizer"  # where the runs of the directory keep it (data.cache_dir)


def row_balance(n: int, tokenizer_dir: str) -> dict:
    ds = CaptionScenes(n, "train", 0, 64, ensure_tokenizer(tokenizer_dir), 8, text_only=True)
    counts: Counter = Counter()
    for i in range(n):
        item = ds[i]
        words = [VOCAB[t] for t in item["row"]["input_ids"]]
        answer = words[-2]  # ... answer: <answer> <eos>
        if answer in ("yes", "no"):
            kind = item["kind"] if item["kind"] == "pope" else (
                "relation" if RELATION_WORDS & set(words) else "exists")  # fmt: skip
            counts[f"{kind}_{answer}"] += 1
    return dict(sorted(counts.items()))


@torch.no_grad()
def lm_prior(lm_dir: str, scenes: int = 300) -> dict:
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).eval()
    ids = {w: i for i, w in enumerate(VOCAB)}
    p_yes, truth = [], []
    for i in range(scenes):
        scene = make_scene(np.random.default_rng([0, 2001, i]), 64)  # the val scenes' seeds (data.py)
        for p in scene_prompts(0, scene, eval_rng(0, "val", i), 0):
            if p.kind == "pope":
                probs = lm(input_ids=torch.tensor([[ids[w] for w in p.words]])).logits[0, -1].softmax(-1)
                p_yes.append(float(probs[ids["yes"]] / (probs[ids["yes"]] + probs[ids["no"]])))
                truth.append(p.answer == "yes")
    p, t = np.array(p_yes), np.array(truth)
    return {
        "questions": len(p),
        "p_yes_mean": float(p.mean()),
        "p_yes_on_yes_items": float(p[t].mean()),
        "p_yes_on_no_items": float(p[~t].mean()),
        "argmax_yes_ratio": float((p > 0.5).mean()),
        "argmax_acc": float(((p > 0.5) == t).mean()),
    }


@torch.no_grad()
def conditional_yes(run: str, scenes: int = 300) -> dict:
    from eve_ds.convert.ds_checkpoint import read_eve_config, resolve_tag_dir
    from eve_ds.data.config import DataConfig
    from eve_ds.tasks.evlm_synthetic.eval import decode, tower_features
    from eve_ds.train.evaluation import load_evlm_checkpoint
    from eve_ds.utils.image import normalize_image

    tag = resolve_tag_dir(run)
    backbone = load_evlm_checkpoint(tag, read_eve_config(tag)).eval().encoder
    data = DataConfig()
    items = [CaptionScenes(scenes, "val", 0, 64, ensure_tokenizer(TOKENIZER), 8)[i] for i in range(scenes)]
    images = torch.stack([it["image"] for it in items])
    feats = tower_features(
        backbone, normalize_image(images, torch.float32, data.image_mean, data.image_std), 256
    )
    prompts = [
        p
        for k, it in enumerate(items)
        for p in scene_prompts(k, it["scene"], eval_rng(0, "val", k), 0)
        if p.kind == "pope" or p.group == "exists"
    ]
    said: dict = {}
    for p, words in zip(prompts, decode(backbone, prompts, feats, list(range(scenes)), 256)):
        colour = p.words[4]  # question: is there a <colour> <shape> ? answer:
        there = colour in {s["colour"] for s in items[p.scene]["scene"]["shapes"]}
        key = (
            f"{p.kind if p.kind == 'pope' else 'exists'}_{p.answer}_colour_{'present' if there else 'absent'}"
        )
        said.setdefault(key, []).append(words == ["yes"])
    return {k: {"n": len(v), "yes_ratio": float(np.mean(v))} for k, v in sorted(said.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", required=True, help="a stage-0 LM folder (RUN/lm)")
    ap.add_argument("--rows", type=int, default=24000)
    ap.add_argument("--run", help="a trained EVLM run directory (or tag)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"rows": args.rows, "train_rows": row_balance(args.rows, TOKENIZER), "lm": lm_prior(args.lm)}
    if args.run:
        out["run"] = {"path": args.run, "yes_by_colour": conditional_yes(args.run)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
