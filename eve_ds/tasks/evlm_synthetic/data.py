"""The synthetic training set of EVLM: scenes of `data/synthetic.py` rendered on the fly, text about them
from `data/scene_text.py` in a word-level vocabulary, one row per scene laid out by `models/evlm/masks.py`:

    caption  [K media tokens] caption: a large red circle to the left of a small blue square <eos>
    vqa      [K media tokens] question: what color is the circle ? answer: red <eos>
    pope     [K media tokens] question: is there a purple triangle ? answer: no <eos>

Each scene's row is one of the kinds, drawn with the probabilities of MIX; only the caption, the answer
and <eos> are labelled. With `text_only` (stage 0, the LM alone) the same strings come without the
image and every token is labelled. A scene is a pure function of (seed, split, index), with seeds
[seed, 2000 + split, index] so that none is a scene of the EVE corpus (seeds [seed, split, index]); the
row's kind and question come from seeds [seed, 2000 + split, index, 1].
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from eve_ds.data.scene_text import POPE_SAMPLERS, TEMPLATES, pope_questions, popular_pairs
from eve_ds.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES, caption, make_scene, render
from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.utils.io import staging_dir

PAD, MEDIA, EOS, PROMPT = "<pad>", "<|evlm_media|>", "<eos>", "caption:"
QUESTION, ANSWER = "question:", "answer:"
CAPTION_WORDS = sorted(
    {"a", "the", "and", *(w for r in RELATIONS.values() for w in r.split()), *SIZES, *COLOURS, *SHAPES}
)
# The words of the VQA templates and POPE questions that captions do not use, and the answers.
QA_WORDS = ["?", "what", "color", "is", "shape", "object", "size", "how", "many", "shapes", "are", "there",
            "yes", "no", "0", "1", "2", "3"]  # fmt: skip
# Fixed ids: the config can name the media token's id (model.media_token_id) before any file exists; the
# words added later come after the first ones, whose ids stay.
VOCAB = [PAD, MEDIA, EOS, PROMPT, *CAPTION_WORDS, QUESTION, ANSWER, *QA_WORDS]
SPLITS = {"train": 0, "val": 1}
MIX = {"caption": 0.4, "vqa": 0.4, "pope": 0.2}  # [ours] the share of each row kind in training


def words(text: str) -> list[str]:
    """A question or caption as vocabulary words: "?" is a word of its own."""
    return text.replace("?", " ?").split()


def qa_text(question: str) -> list[str]:
    """The prompt of a question: ["question:", *words, "answer:"]."""
    return [QUESTION, *words(question), ANSWER]


def row_text(scene: dict, rng: np.random.Generator, kind: str, seed: int) -> tuple[list[str], list[str]]:
    """(prompt words, target words) of one row of `kind` about `scene` (the target ends with <eos>)."""
    if kind == "caption":
        return [PROMPT], [*words(caption(scene)), EOS]
    if kind == "vqa":
        made = None
        while made is None:  # a template that fits the scene (colour, shape, size, count always do)
            made = TEMPLATES[list(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]](scene, rng)
        return qa_text(made[0]), [made[1], EOS]
    sampler = POPE_SAMPLERS[int(rng.integers(len(POPE_SAMPLERS)))]
    question, answer = pope_questions(scene, rng, sampler, popular_pairs(seed))[int(rng.integers(2))]
    return qa_text(question), [answer, EOS]


def ensure_tokenizer(path: str):
    """The word-level tokenizer of VOCAB, saved with `save_pretrained` into `path` when missing (or when
    it holds another vocabulary: one written before words were added).

    Loaded as `PreTrainedTokenizerFast` itself: AutoTokenizer picks its class from a model config, and next
    to a qwen2 `config.json` it would load a Qwen2 tokenizer instead of this vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file) or Tokenizer.from_file(file).get_vocab() != {
        w: i for i, w in enumerate(VOCAB)
    }:
        tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=PAD))
        # Whitespace only: a punctuation split would cut "caption:" in two.
        tok.pre_tokenizer = WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
        with staging_dir(path, overwrite=True) as tmp:
            fast.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


class CaptionScenes(Dataset):
    """Item i of `split`: {"row": a `layout_row` dict, "image": (3, S, S) uint8 (None when text_only),
    "scene": dict, "kind": one of MIX}."""

    def __init__(
        self, n: int, split: str, seed: int, image_size: int, tokenizer, num_media_tokens: int,
        text_only: bool = False,
    ) -> None:  # fmt: skip
        self.n, self.split, self.seed, self.image_size = n, split, seed, image_size
        self.num_media_tokens, self.text_only = num_media_tokens, text_only
        self.ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VOCAB}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, 2000 + SPLITS[self.split], i])
        scene = make_scene(rng, self.image_size)
        text_rng = np.random.default_rng([self.seed, 2000 + SPLITS[self.split], i, 1])
        kind = list(MIX)[int(text_rng.choice(len(MIX), p=list(MIX.values())))]
        prompt, target = row_text(scene, text_rng, kind, self.seed)
        prompt_ids, target_ids = [self.ids[w] for w in prompt], [self.ids[w] for w in target]
        if self.text_only:  # stage 0: next-token loss on all the text
            row = layout_row([[{"text": prompt_ids + target_ids}]], self.ids[MEDIA], self.num_media_tokens)
            return {"row": row, "image": None, "scene": scene, "kind": kind}
        image = np.array(render(scene, rng, self.image_size))  # writable: torch shares its memory
        doc = [{"image": 0}, {"text": prompt_ids, "loss": False}, {"text": target_ids}]
        return {
            "row": layout_row([doc], self.ids[MEDIA], self.num_media_tokens),
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "scene": scene,
            "kind": kind,
        }


def collate(items: list[dict], image_size: int = 64) -> dict:
    """-> the `stack_rows` fields (B, S), image (B, 3, S, S) uint8 with image_slot (B, 2) = (row, 0) and
    num_slots 1: one image per row (the trainer normalises `image`, as for EVE's batches). Text-only
    items: no image, image (0, 3, S, S) and image_slot (0, 2)."""
    batch = stack_rows([it["row"] for it in items], pad_id=VOCAB.index(PAD))
    if items[0]["image"] is None:
        batch["image"] = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        batch["image_slot"] = torch.zeros(0, 2, dtype=torch.long)
        batch["num_slots"] = 1
        return batch
    batch["image"] = torch.stack([it["image"] for it in items])
    batch["image_slot"] = torch.stack(
        [torch.arange(len(items)), torch.zeros(len(items), dtype=torch.long)], 1
    )
    batch["num_slots"] = 1
    return batch
