"""Why POPE can sit at chance in the tiny EVLM runs: the yes / no balance of the training rows, and what the
stage-0 LM (RUN/lm, text only) answers to the evaluation's POPE questions before any image is read.

    python benchmarks/evlm_pope_probe.py --lm runs/evlm_tiny_synthetic/lm --rows 24000 --json OUT.json

Rows: the first `--rows` training scenes of `evlm_synthetic` (750 steps x 32 rows = 24,000 is what the
tiny run reads), counted by kind (pope, and the yes/no VQA templates exists and relation) and answer.
LM: P(yes) / (P(yes) + P(no)) at the answer position of every POPE prompt of the 300 validation scenes,
for the questions whose answer is yes and those whose answer is no (equal means: no text prior leaks).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", required=True, help="a stage-0 LM folder (RUN/lm)")
    ap.add_argument("--rows", type=int, default=24000)
    ap.add_argument("--tokenizer-dir", default="data/evlm_synthetic/tokenizer")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {
        "rows": args.rows,
        "train_rows": row_balance(args.rows, args.tokenizer_dir),
        "lm": lm_prior(args.lm),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
