"""EVLM's generation evaluation on synthetic scenes: greedy decoding with the KV cache, then the metrics
of `metrics.py`, each twice: with every scene's own image, and with the images rolled by one across the
evaluated scenes (`*_blind`: scene i reads the image of scene i - 1), the control that tells what the
image adds to what the text alone (the LM's prior, the question) already gives.

Per scene: a caption prompt ("caption:"), one question per VQA template that fits the scene, and POPE's
pair (a present object, an absent one) for each sampler. The ViT runs once per image; prompts of the same
length and kind are decoded together, so no row is padded. Under expert parallelism every rank makes the
same decoding calls (`decode_plan`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from eve_ds.data.scene_text import (
    POPE_SAMPLERS,
    TEMPLATES,
    objects,
    paraphrases,
    parse_objects,
    pope_questions,
    popular_pairs,
)
from eve_ds.data.synthetic import caption
from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.models.evlm.xattn import Media
from eve_ds.tasks.evlm_synthetic.data import EOS, MEDIA, PAD, PROMPT, SPLITS, VOCAB, qa_text
from eve_ds.tasks.evlm_synthetic.metrics import cider_bleu, exact_match, object_f1, pope_scores
from eve_ds.utils.ranks import gather_objects

MAX_CAPTION_TOKENS = 32  # the longest caption has 24 words
MAX_ANSWER_TOKENS = 3  # an answer word and <eos>, one to spare


@dataclass
class Prompt:
    scene: int  # position in the evaluated scenes
    kind: str  # caption | vqa | pope
    group: str  # the VQA template or the POPE sampler ("" for captions)
    words: list[str]
    answer: str = ""


def scene_prompts(position: int, scene: dict, rng: np.random.Generator, seed: int) -> list[Prompt]:
    """The caption prompt, one question per fitting template and POPE's pairs for one scene."""
    prompts = [Prompt(position, "caption", "", [PROMPT])]
    for name, template in TEMPLATES.items():
        made = template(scene, rng)
        if made is not None:
            prompts.append(Prompt(position, "vqa", name, qa_text(made[0]), made[1]))
    for sampler in POPE_SAMPLERS:
        for question, answer in pope_questions(scene, rng, sampler, popular_pairs(seed)):
            prompts.append(Prompt(position, "pope", sampler, qa_text(question), answer))
    return prompts


def references(scene: dict, rng: np.random.Generator) -> list[str]:
    """The canonical caption first, then the paraphrases of the synthetic retrieval sets."""
    return list(dict.fromkeys([caption(scene), *paraphrases(scene, rng)]))


def eval_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 2000 + SPLITS[split], index, 2])


@torch.no_grad()
def tower_features(backbone, images: Tensor, batch_size: int) -> list[Tensor]:
    """images: (N, 3, S, S) normalised -> one (N, 1 + P, Dv) tensor per feature level."""
    chunks = [backbone.vision(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(level) for level in zip(*chunks)]


def decode(backbone, prompts: list[Prompt], feats: list[Tensor], image_of: list[int],
           batch_size: int) -> list[list[str]]:  # fmt: skip
    """The generated words of every prompt (up to <eos>); prompt p reads the image `image_of[p.scene]`."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    K = backbone.cfg.num_media_tokens
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for n, p in enumerate(prompts):
        by_shape[(p.kind == "caption", len(p.words))].append(n)
    out: list[list[str]] = [[] for _ in prompts]
    device = feats[0].device
    for (is_caption, length), chunk in decode_plan(by_shape, batch_size, backbone.collective):
        # An empty chunk: another rank decodes prompts of this shape; this one joins with a stand-in row.
        words = [prompts[n].words for n in chunk] or [[PROMPT] * length]
        rows = [layout_row([[{"image": 0}, {"text": [ids[w] for w in ws]}]], ids[MEDIA], K) for ws in words]
        batch = {k: v.to(device) for k, v in stack_rows(rows, pad_id=ids[PAD]).items()}
        images = torch.tensor([image_of[prompts[n].scene] for n in chunk] or [0], device=device)
        batch["image_slot"] = torch.stack([torch.arange(len(words), device=device), 0 * images], 1)
        batch["num_slots"] = 1
        media = Media([f[images][:, None] for f in feats], batch["lo"], batch["hi"])
        steps = MAX_CAPTION_TOKENS if is_caption else MAX_ANSWER_TOKENS
        tokens = backbone.generate_greedy(batch, steps, ids[EOS], media=media)
        for n, row in zip(chunk, tokens.tolist()):
            words = [VOCAB[t] for t in row]
            out[n] = words[: words.index(EOS)] if EOS in words else words
    return out


def decode_plan(by_shape: dict[tuple, list[int]], batch_size: int,
                collective: bool) -> list[tuple[tuple, list[int]]]:  # fmt: skip
    """The (shape, prompt indices) batches to decode, shapes in order. `collective` (expert parallelism:
    every forward is a collective call): every rank makes the same calls, the union of the ranks' shapes
    with the most batches any rank has of each, so a rank short of a shape gets empty batches."""
    mine = {
        shape: [m[i : i + batch_size] for i in range(0, len(m), batch_size)] for shape, m in by_shape.items()
    }
    counts = {shape: len(chunks) for shape, chunks in mine.items()}
    if collective:
        for other in gather_objects(counts):
            for shape, n in other.items():
                counts[shape] = max(n, counts.get(shape, 0))
    return [
        (shape, chunk)
        for shape in sorted(counts)
        for chunk in mine.get(shape, []) + [[]] * (counts[shape] - len(mine.get(shape, [])))
    ]


def generation_metrics(prompts: list[Prompt], generated: list[list[str]], scenes: list[dict],
                       refs: list[list[str]]) -> dict:  # fmt: skip
    """Every metric of one pass (with or without the right images)."""
    captions = {p.scene: " ".join(g) for p, g in zip(prompts, generated) if p.kind == "caption"}
    out = cider_bleu(captions, {i: refs[i] for i in captions})
    out |= object_f1([parse_objects(captions[i]) for i in captions], [objects(scenes[i]) for i in captions])
    answers = [(p, " ".join(g)) for p, g in zip(prompts, generated) if p.kind != "caption"]
    out |= exact_match([(p.group, a, p.answer) for p, a in answers if p.kind == "vqa"], "vqa")
    pope = [(p, a) for p, a in answers if p.kind == "pope"]
    out |= pope_scores([a for _, a in pope], [p.answer for p, _ in pope], "pope")
    for sampler in POPE_SAMPLERS:
        mine = [(p, a) for p, a in pope if p.group == sampler]
        out |= pope_scores([a for _, a in mine], [p.answer for p, _ in mine], f"pope_{sampler}")
    return out
