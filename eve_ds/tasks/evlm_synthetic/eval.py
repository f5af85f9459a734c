"""EVLM's generation evaluation on synthetic scenes: greedy decoding with the KV cache, then the metrics
of `metrics.py`, each twice: with every scene's own image, and with the images rolled by one across the
evaluated scenes (`*_blind`: scene i reads the image of scene i - 1), the control that tells what the
image adds to what the text alone (the LM's prior, the question) already gives.

Per scene: a caption prompt ("caption:"), one question per VQA template that fits the scene, and POPE's
pair (a present object, an absent one) for each sampler; with the opt-in kinds of the run
(`task.synthetic_extra_kinds`) also a grounding question per shape, an interleaved prompt (the scene's
image and caption, then a second scene's image: its caption is generated) and a video question (the
scene's clip). Interleaved and video prompts are decoded a third time with their images in reverse order
within the prompt (`interleaved_*_rolled`: the second caption reads the first image; `video_*_reversed`:
the clip played backwards, scored against the opposite direction). The ViT runs once per image; prompts of
the same layout are decoded together, so no row is padded. Under expert parallelism every rank makes the
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
from eve_ds.tasks.evlm_synthetic.data import (
    EOS,
    MEDIA,
    PAD,
    PROMPT,
    SPLITS,
    VOCAB,
    box_from_words,
    box_words,
    grounding_question,
    qa_text,
    video_question,
    words,
)
from eve_ds.tasks.evlm_synthetic.metrics import (
    cider_bleu,
    exact_match,
    grounding_scores,
    object_f1,
    pope_scores,
)
from eve_ds.utils.ranks import gather_objects

MAX_CAPTION_TOKENS = 32  # the longest caption has 24 words
MAX_ANSWER_TOKENS = 3  # an answer word and <eos>, one to spare
MAX_NEW_TOKENS = {"caption": MAX_CAPTION_TOKENS, "interleaved": MAX_CAPTION_TOKENS, "grounding": 6}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class Prompt:
    scene: int  # position in the evaluated scenes
    kind: str  # caption | vqa | pope | grounding | interleaved | video
    group: str  # the VQA template or the POPE sampler ("" otherwise)
    words: list[str]  # the text after the last image: what decoding continues
    answer: str = ""
    # The images read, in slot order, as indices into the evaluation's images; () for the scene's own.
    media: tuple[int, ...] = ()
    # The segments before `words`: ("image",), ("video", frames) or ("text", words) (not labelled).
    segments: tuple = (("image",),)
    truth: object = None  # grounding: (the true box, the image size); interleaved: the second scene


def layout_key(p: Prompt) -> tuple:
    """What rows decoded together share: new tokens, each segment's kind and length, the prompt length."""
    sig = tuple((seg[0], len(seg[1]) if seg[0] == "text" else (seg[1] if seg[0] == "video" else 1))
                for seg in p.segments)  # fmt: skip
    return MAX_NEW_TOKENS.get(p.kind, MAX_ANSWER_TOKENS), sig, len(p.words)


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


@dataclass
class ExtraImages:
    """Where the opt-in kinds' images sit in the evaluation's image list: after the n scenes' own, the
    second images of the interleaved prompts (one per scene), then the clips' frames (`frames` per scene)."""

    n: int
    interleaved: bool
    frames: int  # 0: no video prompts

    def second(self, k: int) -> int:
        return self.n + k

    def frame(self, k: int, f: int) -> int:
        return self.n * (1 + self.interleaved) + k * self.frames + f

    def roll(self, j: int) -> int:
        """The image of the same role in the previous scene (the blind control)."""
        n, start = self.n, self.n * (1 + self.interleaved)
        if j < n:
            return (j - 1) % n
        if j < start:
            return n + (j - n - 1) % n
        k, f = divmod(j - start, self.frames)
        return start + ((k - 1) % n) * self.frames + f


def extra_prompts(position: int, scene: dict, kinds, image_size: int, where: ExtraImages,
                  second: dict | None = None, clip: dict | None = None) -> list[Prompt]:  # fmt: skip
    """The opt-in kinds' prompts of one scene: a grounding question per shape, the interleaved prompt
    (the scene's caption given, the second scene's generated), the clip's direction question."""
    prompts = []
    if "grounding" in kinds:
        for shape in scene["shapes"]:
            answer = " ".join(box_words(shape["bbox"], image_size))
            prompts.append(Prompt(position, "grounding", "", qa_text(grounding_question(shape)), answer,
                                  truth=(shape["bbox"], image_size)))  # fmt: skip
    if "interleaved" in kinds:
        first = ("text", (PROMPT, *words(caption(scene)), EOS))
        prompts.append(Prompt(position, "interleaved", "", [PROMPT], media=(position, where.second(position)),
                              segments=(("image",), first, ("image",)), truth=second))  # fmt: skip
    if "video" in kinds:
        frames = tuple(where.frame(position, f) for f in range(where.frames))
        prompts.append(Prompt(position, "video", "", qa_text(video_question(clip)), clip["direction"],
                              media=frames, segments=(("video", len(frames)),)))  # fmt: skip
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


def prompt_row(segments: tuple, text: list[str], ids: dict, K: int) -> dict:
    """One prompt as a `layout_row`: its segments, then `text` (where decoding continues)."""
    doc = []
    for seg in segments:
        if seg[0] == "text":
            doc.append({"text": [ids[w] for w in seg[1]], "loss": False})
        else:
            doc.append({"image": 0} if seg[0] == "image" else {"video": seg[1]})
    return layout_row([[*doc, {"text": [ids[w] for w in text]}]], ids[MEDIA], K)


def decode(
    backbone, prompts: list[Prompt], feats: list[Tensor], images_of, batch_size: int
) -> list[list[str]]:
    """The generated words of every prompt (up to <eos>); prompt p reads the images `images_of(p)` (indices
    into `feats`, in slot order)."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    K = backbone.cfg.num_media_tokens
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for n, p in enumerate(prompts):
        by_shape[layout_key(p)].append(n)
    out: list[list[str]] = [[] for _ in prompts]
    device = feats[0].device
    for (steps, sig, length), chunk in decode_plan(by_shape, batch_size, backbone.collective):
        if chunk:
            rows = [prompt_row(prompts[n].segments, prompts[n].words, ids, K) for n in chunk]
            images = [list(images_of(prompts[n])) for n in chunk]
        else:  # another rank decodes prompts of this layout; this one joins with a stand-in row
            segments = tuple(("text", [PROMPT] * n) if kind == "text" else (kind, n) for kind, n in sig)
            rows = [prompt_row(segments, [PROMPT] * length, ids, K)]
            images = [[0] * sum(n for kind, n in sig if kind != "text")]
        batch = {k: v.to(device) for k, v in stack_rows(rows, pad_id=ids[PAD]).items()}
        index = torch.tensor(images, device=device)  # (B, M)
        B, M = index.shape
        batch["image_slot"] = torch.stack(
            [torch.arange(B, device=device).repeat_interleave(M), torch.arange(M, device=device).repeat(B)], 1
        )
        batch["num_slots"] = M
        media = Media(
            backbone.with_time([f[index] for f in feats], batch["clip_of_slot"]), batch["lo"], batch["hi"]
        )
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
    return out | extra_metrics(prompts, generated)


def extra_metrics(prompts: list[Prompt], generated: list[list[str]], reversed_images: bool = False) -> dict:
    """The opt-in kinds' metrics (those with prompts): grounding accuracy and IoU, the interleaved second
    caption's object F1, video direction accuracy. `reversed_images` (the prompts' images were given in
    reverse order): `interleaved_object_f1_rolled` (against the second scene still) and
    `video_direction_reversed` (against the opposite direction)."""
    out = {}
    ground = [(p, g) for p, g in zip(prompts, generated) if p.kind == "grounding"]
    if ground:  # truth: (the box in pixels, the image size); the answer's words are on the lattice
        boxes = [box_from_words(g, p.truth[1]) for p, g in ground]
        out |= grounding_scores(boxes, [p.truth[0] for p, _ in ground])
    suffix = ("_rolled", "_reversed") if reversed_images else ("", "")
    inter = [(p, g) for p, g in zip(prompts, generated) if p.kind == "interleaved"]
    if inter:
        f1 = object_f1([parse_objects(" ".join(g)) for _, g in inter], [objects(p.truth) for p, _ in inter])
        out["interleaved_object_f1" + suffix[0]] = f1["object_f1"]
    video = [(p, g) for p, g in zip(prompts, generated) if p.kind == "video"]
    if video:
        want = [OPPOSITE[p.answer] if reversed_images else p.answer for p, _ in video]
        hits = sum(" ".join(g) == w for (_, g), w in zip(video, want))
        out["video_direction" + suffix[1]] = hits / len(video)
    return out
