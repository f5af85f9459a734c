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

Opt-in kinds (`task.synthetic_extra_kinds`, a share of the rows each; the rest keep the mix above):

    grounding    [K] question: where is the red circle ? answer: 3 5 7 9 <eos>
    interleaved  [K] caption: <scene's caption> <eos> [K] caption: <a second scene's caption> <eos>
    video        [F x K] question: where does the red circle move ? answer: left <eos>

A grounding answer is the box (x0 y0 x1 y1) with its corners rounded to a GRID x GRID lattice; an
interleaved row's second caption reads only the second image (masks.py), its first caption is labelled
too; a video is VIDEO_FRAMES frames of one shape crossing a still background, the caption-side text reading
all frames and each frame's media tokens their own. Whether a row is of an opt-in kind is drawn from
seeds [seed, 2000 + split, index, 3], their content from [..., 4] (grounding), [..., 5] (interleaved)
and [..., 6] (video): with no opt-in kind every row is the one it is without them, bit for bit.
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
GRID = 16  # [ours] grounding boxes: corners rounded to multiples of image_size / GRID (words 0..GRID)
VIDEO_FRAMES = 4  # [ours] frames per synthetic clip
DIRECTIONS = ("left", "right", "up", "down")  # a clip's motion; "left" / "right" are caption words
GROUNDING_WORDS = ["where", *(str(v) for v in range(4, GRID + 1))]
VIDEO_WORDS = ["does", "move", "up", "down"]
VOCAB = [PAD, MEDIA, EOS, PROMPT, *CAPTION_WORDS, QUESTION, ANSWER, *QA_WORDS, *GROUNDING_WORDS, *VIDEO_WORDS]
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


def box_words(bbox: list[int], image_size: int) -> list[str]:
    """A box (x0, y0, x1, y1) in pixels -> its corners on the GRID lattice, as words."""
    return [str(round(v * GRID / image_size)) for v in bbox]


def box_from_words(ws: list[str], image_size: int) -> list[float] | None:
    """The inverse of `box_words` (None when `ws` is not four lattice coordinates)."""
    if len(ws) != 4 or not all(w.isdigit() and int(w) <= GRID for w in ws):
        return None
    return [int(w) * image_size / GRID for w in ws]


def grounding_question(shape: dict) -> str:
    """The referring question of one shape: its colour and kind are unique within a scene."""
    return f"where is the {shape['colour']} {shape['shape']}?"


def make_clip(rng: np.random.Generator, image_size: int) -> tuple[dict, list[np.ndarray]]:
    """One moving-shape video: {"shape": {colour, shape, size}, "direction", "boxes": per frame} and its
    VIDEO_FRAMES frames (S, S, 3) uint8: the shape moves in `direction`, evenly stepped, over a background
    that stays the same (one noise draw for every frame)."""
    colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    side = int(rng.integers(*SIZES[size], endpoint=True)) * image_size // 64
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    # A travel of a quarter to a half of the image about a uniform midpoint: where the shape is in one
    # frame says little about where it goes; comparing frames says it all.
    travel = float(rng.uniform(image_size / 4, image_size / 2))
    lo, hi = 1 + travel / 2, image_size - side - 1 - travel / 2
    mid = float(rng.uniform(lo, hi))
    along = np.linspace(mid - travel / 2, mid + travel / 2, VIDEO_FRAMES).round().astype(int).tolist()
    if direction in ("left", "up"):
        along = along[::-1]
    across = int(rng.integers(1, image_size - side))
    corners = [(a, across) if direction in ("left", "right") else (across, a) for a in along]
    boxes = [[x, y, x + side, y + side] for x, y in corners]
    background = int(rng.integers(2**31))
    shape = {"colour": colour, "shape": kind, "size": size}
    frames = [
        np.array(render({"shapes": [{**shape, "bbox": b}]}, np.random.default_rng(background), image_size))
        for b in boxes
    ]
    return {"shape": shape, "direction": direction, "boxes": boxes}, frames


def video_question(clip: dict) -> str:
    return f"where does the {clip['shape']['colour']} {clip['shape']['shape']} move?"


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
    """Item i of `split`: {"row": a `layout_row` dict, "image": the scene's image (3, S, S) uint8,
    "media": the row's images in slot order (n, 3, S, S) uint8 (both None when text_only), "scene": dict,
    "kind": one of MIX or of the opt-in kinds}; a video row also has "clip", an interleaved row "second"
    (the second scene)."""

    def __init__(
        self, n: int, split: str, seed: int, image_size: int, tokenizer, num_media_tokens: int,
        text_only: bool = False, extra_kinds: dict[str, float] | None = None,
    ) -> None:  # fmt: skip
        self.n, self.split, self.seed, self.image_size = n, split, seed, image_size
        self.num_media_tokens, self.text_only = num_media_tokens, text_only
        self.extra_kinds = {k: float(v) for k, v in (extra_kinds or {}).items() if v > 0}
        self.ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VOCAB}

    def __len__(self) -> int:
        return self.n

    def seeds(self, i: int, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 2000 + SPLITS[self.split], i, *stream])

    def extra_kind(self, i: int) -> str | None:
        """The opt-in kind of row i, or None (the MIX draw decides)."""
        if not self.extra_kinds:
            return None
        r, acc = self.seeds(i, 3).random(), 0.0
        for kind in sorted(self.extra_kinds):
            acc += self.extra_kinds[kind]
            if r < acc:
                return kind
        return None

    def second_scene(self, i: int) -> tuple[dict, np.ndarray]:
        """The second scene of interleaved row i and its image (S, S, 3)."""
        rng = self.seeds(i, 5)
        scene = make_scene(rng, self.image_size)
        return scene, np.array(render(scene, rng, self.image_size))

    def clip(self, i: int) -> tuple[dict, list[np.ndarray]]:
        """The clip of video row i (`make_clip`)."""
        return make_clip(self.seeds(i, 6), self.image_size)

    def __getitem__(self, i: int) -> dict:
        rng = self.seeds(i)
        scene = make_scene(rng, self.image_size)
        text_rng = self.seeds(i, 1)
        kind = self.extra_kind(i) or list(MIX)[int(text_rng.choice(len(MIX), p=list(MIX.values())))]
        item = {"scene": scene, "kind": kind}
        media: list[np.ndarray] = []
        if kind in MIX:
            prompt, target = row_text(scene, text_rng, kind, self.seed)
            segments = [("image", None), (prompt, False), (target, True)]
        elif kind == "grounding":
            shapes = scene["shapes"]
            shape = shapes[int(self.seeds(i, 4).integers(len(shapes)))]
            target = [*box_words(shape["bbox"], self.image_size), EOS]
            segments = [("image", None), (qa_text(grounding_question(shape)), False), (target, True)]
        elif kind == "interleaved":
            second, image = self.second_scene(i)
            item["second"] = second
            media = [image]
            segments = [("image", None), ([PROMPT], False), ([*words(caption(scene)), EOS], True),
                        ("image", 1), ([PROMPT], False), ([*words(caption(second)), EOS], True)]  # fmt: skip
        else:  # video
            clip, frames = self.clip(i)
            item["clip"] = clip
            segments = [("video", len(frames)), (qa_text(video_question(clip)), False),
                        ([clip["direction"], EOS], True)]  # fmt: skip
        if self.text_only:  # stage 0: next-token loss on all the text
            text = [self.ids[w] for seg in segments if isinstance(seg[0], list) for w in seg[0]]
            row = layout_row([[{"text": text}]], self.ids[MEDIA], self.num_media_tokens)
            return {**item, "row": row, "image": None, "media": None}
        image = torch.from_numpy(np.array(render(scene, rng, self.image_size))).permute(2, 0, 1).contiguous()
        if kind == "video":
            media = frames
        doc = [
            {seg[0]: seg[1] or 0} if not isinstance(seg[0], list)
            else {"text": [self.ids[w] for w in seg[0]], "loss": seg[1]}
            for seg in segments
        ]  # fmt: skip
        stack = [torch.from_numpy(m).permute(2, 0, 1) for m in media]
        if kind != "video":
            stack = [image, *stack]
        return {
            **item,
            "row": layout_row([doc], self.ids[MEDIA], self.num_media_tokens),
            "image": image,
            "media": torch.stack(stack).contiguous(),
        }


def collate(items: list[dict], image_size: int = 64) -> dict:
    """-> the `stack_rows` fields (B, S), image (N, 3, S, S) uint8: every row's images in slot order,
    image_slot (N, 2) = (row, slot), num_slots the most any row has (1 without opt-in kinds: image_slot
    (row, 0), one image per row). The trainer normalises `image`, as for EVE's batches. Text-only items:
    image (0, 3, S, S) and image_slot (0, 2)."""
    batch = stack_rows([it["row"] for it in items], pad_id=VOCAB.index(PAD))
    if items[0]["media"] is None:
        batch["image"] = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        batch["image_slot"] = torch.zeros(0, 2, dtype=torch.long)
        batch["num_slots"] = 1
        return batch
    batch["image"] = torch.cat([it["media"] for it in items])
    batch["image_slot"] = torch.tensor(
        [(b, m) for b, it in enumerate(items) for m in range(len(it["media"]))], dtype=torch.long
    )
    batch["num_slots"] = max(len(it["media"]) for it in items)
    return batch
