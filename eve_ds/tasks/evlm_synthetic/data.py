"""The synthetic caption set of EVLM: scenes of `data/synthetic.py` rendered on the fly, their captions in a
word-level vocabulary, one row per scene laid out by `models/evlm/masks.py`:

    [K media tokens of the image] caption: a large red circle to the left of a small blue square <eos>

Only the caption words and <eos> are labelled. A scene is a pure function of (seed, split, index), with
seeds [seed, 2000 + split, index] so that none is a scene of the EVE corpus (seeds [seed, split, index]).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from eve_ds.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES, caption, make_scene, render
from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.utils.io import staging_dir

PAD, MEDIA, EOS, PROMPT = "<pad>", "<|evlm_media|>", "<eos>", "caption:"
CAPTION_WORDS = sorted(
    {"a", "the", "and", *(w for r in RELATIONS.values() for w in r.split()), *SIZES, *COLOURS, *SHAPES}
)
# Fixed ids: the config can name the media token's id (model.media_token_id) before any file exists.
VOCAB = [PAD, MEDIA, EOS, PROMPT, *CAPTION_WORDS]
SPLITS = {"train": 0, "val": 1}


def ensure_tokenizer(path: str):
    """The word-level tokenizer of VOCAB, saved with `save_pretrained` into `path` when missing.

    Loaded as `PreTrainedTokenizerFast` itself: AutoTokenizer picks its class from a model config, and next
    to a qwen2 `config.json` it would load a Qwen2 tokenizer instead of this vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=PAD))
        # Whitespace only: a punctuation split would cut "caption:" in two.
        tok.pre_tokenizer = WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
        with staging_dir(path, overwrite=True) as tmp:
            fast.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


class CaptionScenes(Dataset):
    """Item i of `split`: {"row": a `layout_row` dict, "image": (3, S, S) uint8, "scene": dict}."""

    def __init__(self, n: int, split: str, seed: int, image_size: int, tokenizer, num_media_tokens: int):
        self.n, self.split, self.seed, self.image_size = n, split, seed, image_size
        self.num_media_tokens = num_media_tokens
        self.ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VOCAB}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, 2000 + SPLITS[self.split], i])
        scene = make_scene(rng, self.image_size)
        image = np.array(render(scene, rng, self.image_size))  # writable: torch shares its memory
        words = [self.ids[w] for w in caption(scene).split()] + [self.ids[EOS]]
        doc = [{"image": 0}, {"text": [self.ids[PROMPT]], "loss": False}, {"text": words}]
        return {
            "row": layout_row([doc], self.ids[MEDIA], self.num_media_tokens),
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "scene": scene,
        }


def collate(items: list[dict]) -> dict:
    """-> the `stack_rows` fields (B, S), image (B, 3, S, S) uint8 with image_slot (B, 2) = (row, 0) and
    num_slots 1: one image per row (the trainer normalises `image`, as for EVE's batches)."""
    batch = stack_rows([it["row"] for it in items], pad_id=VOCAB.index(PAD))
    batch["image"] = torch.stack([it["image"] for it in items])
    batch["image_slot"] = torch.stack(
        [torch.arange(len(items)), torch.zeros(len(items), dtype=torch.long)], 1
    )
    batch["num_slots"] = 1
    return batch
