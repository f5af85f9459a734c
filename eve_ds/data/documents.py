"""Readers of the official annotation layouts into EVLM documents: lists of text / image / video segments.

A document is what `packed.py` packs into rows (and what one row's `samples` entry holds):

    Document(kind, source, id, segments=[{"text": "...", "loss": True},
                                          {"image": "rel/path.jpg"},
                                          {"video": ["dir/f0.jpg", ...], "fps": 1},
                                          {"role": "user", "text": "...", "loss": False}, ...])

Image paths are relative to the image root until the shard writer stores the bytes. Formats:

| format        | input                                                                                    |
|---------------|------------------------------------------------------------------------------------------|
| `interleaved` | OBELICS (`texts` and `images`, parallel lists, null where the other holds the entry) or    |
|               | MMC4 (`text_list`, `image_info` with `image_name` / `matched_text_index`: each image goes  |
|               | before its matched sentence, as OpenFlamingo's loader puts it), a JSON list or JSON lines  |
| `caption`     | the caption sources of `sources.py` (albef-json, coco, csv): [image, caption]              |
| `vqa`         | a JSON list of {"image", "question", "answer" (a string or a list: the most common)}       |
| `grounding`   | RefCOCO (`refs(unc).p` next to `instances.json`) or Visual Genome `region_descriptions.json`|
| `sft`         | LLaVA conversation JSON ({"image", "conversations": [{"from": human/gpt, "value"}]})       |
| `video`       | a JSON list of {"video": frame folder, "caption" or "conversations" (`<video>`)}          |

The prompt templates (`question: ... answer:`, `user:` / `assistant:`) are ours; grounding writes boxes as
`<ref>phrase</ref><box>(x0,y0),(x1,y1)</box>` normalised to [0, 1000), Qwen-VL's format [ours: the choice].

Annotations that do not follow the layout raise DataError naming the file and the item; one bad document
(a missing image, an image placeholder count that does not match, an empty text, a JSON line that does not
parse) is skipped and named in skipped.jsonl with its reason, so a long conversion keeps going.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from eve_ds.data.manifest import DataError
from eve_ds.data.sources import FORMATS as CAPTION_FORMATS
from eve_ds.data.sources import SkipSample, clean_caption, read_records

DOCUMENT_FORMATS = ("interleaved", "caption", "vqa", "grounding", "sft", "video")
KINDS = ("caption", "interleaved", "vqa", "grounding", "ocr", "sft", "video")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BOX_SCALE = 1000  # Qwen-VL: coordinates as integers in [0, 1000)


@dataclass
class Document:
    index: int  # position in the input (line or item), what skipped.jsonl names
    kind: str
    source: str
    id: str
    segments: list[dict]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "id": self.id, "segments": self.segments}


@dataclass
class Skip:
    """A document left out, with the skipped.jsonl fields."""

    index: int
    id: str
    reason: str
    image: str | None = None


def text(value: str, loss: bool = True, role: str | None = None) -> dict:
    seg = {"text": value, "loss": loss}
    return seg if role is None else {"role": role, **seg}


def check_segment(seg, where: str) -> str:
    """The kind of `seg` (text | image | video); DataError naming `where` for anything else."""
    kinds = [k for k in ("text", "image", "video") if isinstance(seg, dict) and k in seg]
    if len(kinds) != 1:
        keys = sorted(seg) if isinstance(seg, dict) else type(seg).__name__
        raise DataError(f"unknown segment kind ({where}: {keys}); expected exactly one of text, image, video")
    return kinds[0]


# ---------------------------------------------------------------------------------------------------
# Files


def load_items(path: str) -> Iterator[tuple[int, object]]:
    """(index, item) of a JSON list or of JSON lines (`.jsonl`); an unparsable line -> (index, Skip)."""
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found ({path}); check --input")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except ValueError:
                    yield i, Skip(i, f"line {i + 1}", "malformed_json")
        return
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except ValueError as e:
        raise DataError(
            f"the annotation file is not JSON ({path}: {e}); give a JSON list or .jsonl"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"the annotation file is not a JSON list ({path}: {type(items).__name__})")
    yield from enumerate(items)


def field(item, key: str, path: str, index: int, types=str):
    """item[key], checked to be a dict entry of `types`; DataError naming the file, item and key."""
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, types):
        got = "missing" if value is None else type(value).__name__
        raise DataError(f"annotation item {index} has no usable {key!r} ({path}: {got}); see docs/evlm.md")
    return value


class MissingImage(Exception):
    """args[0]: the image path (relative to the image root) that is not a file."""


def image_segment(rel: str, image_root: str) -> dict:
    if not os.path.isfile(os.path.join(image_root, rel)):
        raise MissingImage(rel)
    return {"image": rel}


# ---------------------------------------------------------------------------------------------------
# Per-format documents (item -> segments)


def interleaved_segments(item: dict, path: str, i: int, image_root: str) -> list[dict]:
    """OBELICS or MMC4 item -> text / image segments in document order (adjacent texts joined by a space)."""
    if "texts" in item:
        texts = field(item, "texts", path, i, list)
        images = item.get("images") or [None] * len(texts)
        if not isinstance(images, list) or len(images) != len(texts):
            raise DataError(f"annotation item {i}: 'images' and 'texts' differ in length ({path})")
        order = [("image", im) if im is not None else ("text", t) for im, t in zip(images, texts)]
        order = [(k, v) for k, v in order if v is not None]
    elif "text_list" in item:
        texts = field(item, "text_list", path, i, list)
        before = collections.defaultdict(list)
        for info in field(item, "image_info", path, i, list):
            before[field(info, "matched_text_index", path, i, int)].append(field(info, "image_name", path, i))
        order = [
            (k, v)
            for j, t in enumerate(texts)
            for k, v in [*(("image", im) for im in before[j]), ("text", t)]
        ]
    else:
        raise DataError(
            f"annotation item {i} is neither OBELICS nor MMC4 ({path}: keys {sorted(item)}); expected "
            "'texts' (+ 'images') or 'text_list' + 'image_info'"
        )
    segments: list[dict] = []
    for kind, value in order:
        if kind == "image":
            segments.append(image_segment(value, image_root))
        elif str(value).strip():
            if segments and "text" in segments[-1]:
                segments[-1]["text"] += " " + " ".join(str(value).split())
            else:
                segments.append(text(" ".join(str(value).split())))
    return segments


def vqa_segments(item: dict, path: str, i: int, image_root: str) -> list[dict]:
    answer = item.get("answer", item.get("answers"))
    if isinstance(answer, list):  # VQA's ten answers (strings or {"answer": ...}): the most common one
        answers = [a["answer"] if isinstance(a, dict) else a for a in answer]
        answer = collections.Counter(answers).most_common(1)[0][0] if answers else None
    if not isinstance(answer, str):
        raise DataError(f"annotation item {i} has no usable 'answer' ({path}); expected a string or a list")
    question = " ".join(field(item, "question", path, i).split())
    return [
        image_segment(field(item, "image", path, i), image_root),
        text(f"question: {question} answer:", loss=False, role="user"),
        text(" " + answer.strip(), role="assistant"),
    ]


def conversation_segments(item: dict, path: str, i: int, media: list[dict], placeholder: str) -> list[dict]:
    """LLaVA turns -> user / assistant segments; each placeholder in a human turn takes the next of `media`
    (media the turns do not place go before the first turn, as LLaVA does)."""
    turns = field(item, "conversations", path, i, list)
    placed = sum(str(t.get("value", "")).count(placeholder) for t in turns if isinstance(t, dict))
    if placed and placed != len(media):
        raise ValueError("image_placeholder_mismatch")
    pending = iter(media)
    segments: list[dict] = [] if placed else list(media)
    for t, turn in enumerate(turns):
        role = ROLES.get(field(turn, "from", path, i))
        if role is None:
            raise DataError(
                f"annotation item {i} turn {t}: unknown speaker {turn['from']!r} ({path}); expected one of "
                f"{sorted(ROLES)}"
            )
        value = field(turn, "value", path, i)
        if role == "assistant":
            segments.append(text(" " + " ".join(value.split()), role="assistant"))
            continue
        segments.append(text(f"{role}:", loss=False, role=role))
        for j, part in enumerate(value.split(placeholder)):
            if j:
                segments.append(next(pending))
            if part.strip():
                segments.append(text(" " + " ".join(part.split()), loss=False, role=role))
        if role == "user":
            segments.append(text(" assistant:", loss=False, role="user"))
    return segments


def sft_segments(item: dict, path: str, i: int, image_root: str) -> list[dict]:
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else images
    media = [image_segment(im, image_root) for im in images]
    return conversation_segments(item, path, i, media, IMAGE_PLACEHOLDER)


def video_frames(folder: str, image_root: str, frames: int) -> tuple[list[str], int]:
    """(`frames` frame files of `folder`, uniformly spaced in name order [ours: the sampling]; all frames)."""
    full = os.path.join(image_root, folder)
    names = (
        sorted(n for n in os.listdir(full) if n.lower().endswith(FRAME_EXTENSIONS))
        if os.path.isdir(full)
        else []
    )
    if not names:
        raise MissingImage(folder)
    picks = np.unique(np.linspace(0, len(names) - 1, min(frames, len(names))).round().astype(int))
    return [os.path.join(folder, names[k]) for k in picks], len(names)


def video_segments(item: dict, path: str, i: int, image_root: str, frames: int = 8) -> list[dict]:
    found, total = video_frames(field(item, "video", path, i), image_root, frames)
    clip: dict = {"video": found}
    if isinstance(item.get("fps"), (int, float)):  # the folder's frame rate, thinned by the sampling
        clip["fps"] = item["fps"] * len(found) / total
    if "conversations" in item:
        return conversation_segments(item, path, i, [clip], VIDEO_PLACEHOLDER)
    return [clip, text(" ".join(field(item, "caption", path, i).split()))]


SEGMENTS = {
    "interleaved": interleaved_segments,
    "vqa": vqa_segments,
    "sft": sft_segments,
    "video": video_segments,
}


def item_documents(fmt: str, path: str, image_root: str, source: str, **options) -> Iterator[Document | Skip]:
    """Documents of a JSON (lines) file of `fmt` in file order, and the skips among them."""
    for i, item in load_items(path):
        if isinstance(item, Skip):
            yield item
            continue
        doc_id = str(item.get("id", item.get("url", i))) if isinstance(item, dict) else str(i)
        try:
            segments = SEGMENTS[fmt](item, path, i, image_root, **options)
        except MissingImage as e:
            yield Skip(i, doc_id, "missing_file", e.args[0])
            continue
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            yield Skip(i, doc_id, e.args[0])
            continue
        yield finish(Document(i, fmt, source, doc_id, segments))


def finish(doc: Document) -> Document | Skip:
    """The document, or a skip when it has no labelled text (nothing to learn from it)."""
    if not any(s.get("loss") and s.get("text", "").strip() for s in doc.segments):
        return Skip(doc.index, doc.id, "empty_text")
    return doc


# ---------------------------------------------------------------------------------------------------
# Captions (the existing sources) and grounding


def caption_documents(
    path: str, image_root: str, source: str, caption_format: str
) -> Iterator[Document | Skip]:
    if caption_format not in CAPTION_FORMATS:
        raise DataError(f"unknown caption format ({caption_format!r}); choose one of {list(CAPTION_FORMATS)}")
    for rec in read_records(caption_format, path):
        try:
            segments = [image_segment(rec.image, image_root), text(clean_caption(rec.caption))]
        except MissingImage:
            yield Skip(rec.index, rec.id, "missing_file", rec.image)
            continue
        except SkipSample as e:  # an empty caption, or bytes that are not UTF-8
            yield Skip(rec.index, rec.id, e.args[0], rec.image)
            continue
        yield finish(Document(rec.index, "caption", source, rec.id, segments))


def box_text(phrase: str, box: tuple[float, float, float, float], width: int, height: int) -> tuple[str, str]:
    """(x, y, w, h) in pixels -> ("<ref>phrase</ref>", "<box>(x0,y0),(x1,y1)</box>"), integers in [0, 1000)."""
    x, y, w, h = box

    def q(v: float, size: int) -> int:
        return min(BOX_SCALE - 1, max(0, math.floor(v / size * BOX_SCALE)))

    corners = f"({q(x, width)},{q(y, height)}),({q(x + w, width)},{q(y + h, height)})"
    return f"<ref>{' '.join(phrase.split())}</ref>", f"<box>{corners}</box>"


def grounding_document(
    index: int, image: str, regions: list[tuple[str, tuple]], image_root: str, source: str, size=None
) -> Document | Skip:
    """One image with (phrase, box) turns: the ref is the prompt, the box is labelled."""
    try:
        segments = [image_segment(image, image_root)]
    except MissingImage:
        return Skip(index, image, "missing_file", image)
    if size is None:
        try:
            with Image.open(os.path.join(image_root, image)) as img:  # the header only
                size = img.size
        except Exception:  # PIL raises many types for a file that is not an image
            return Skip(index, image, "unreadable_image", image)
    for phrase, box in regions:
        if box[2] <= 0 or box[3] <= 0 or not phrase.strip():
            continue  # a degenerate box or an empty phrase: not a turn (counted when no turn is left)
        ref, where = box_text(phrase, box, *size)
        segments += [text(ref, loss=False, role="user"), text(where, role="assistant")]
    return finish(Document(index, "grounding", source, image, segments))


class _NoCode(pickle.Unpickler):
    """RefCOCO's refs file is a pickle of plain lists and dicts: load nothing that runs code."""

    def find_class(self, module: str, name: str):
        raise DataError(f"the refs pickle names {module}.{name}; a RefCOCO refs file holds plain data only")


def refcoco_documents(
    path: str, image_root: str, source: str, split: str | None
) -> Iterator[Document | Skip]:
    """RefCOCO / RefCOCO+ / RefCOCOg: `refs(*).p` and `instances.json` beside it; one document per image."""
    instances = os.path.join(os.path.dirname(path), "instances.json")
    if not os.path.isfile(instances):
        raise DataError(f"RefCOCO needs instances.json next to the refs file ({instances}); check --input")
    with open(path, "rb") as f:
        try:
            refs = _NoCode(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"not a RefCOCO refs pickle ({path}: {e})") from None
    with open(instances, encoding="utf-8") as f:
        inst = json.load(f)
    try:
        images = {im["id"]: im for im in inst["images"]}
        boxes = {a["id"]: a["bbox"] for a in inst["annotations"]}
        by_image: dict[int, list] = collections.defaultdict(list)
        for ref in refs:
            if split is None or ref["split"] == split:
                turns = [(s["sent"], tuple(boxes[ref["ann_id"]])) for s in ref["sentences"]]
                by_image[ref["image_id"]] += turns
        found = [(n, images[i], regions) for n, (i, regions) in enumerate(by_image.items())]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"not a RefCOCO refs / instances pair ({path}: {type(e).__name__} {e}); expected refs with "
            "image_id, ann_id, split, sentences and instances.json with images and annotations (id, bbox)"
        ) from None
    for n, im, regions in found:
        yield grounding_document(n, im["file_name"], regions, image_root, source, (im["width"], im["height"]))


def vg_image(image_id: int, image_root: str) -> str:
    """Visual Genome's images sit in VG_100K/ and VG_100K_2/; either, or the root itself."""
    for sub in ("", "VG_100K", "VG_100K_2"):
        rel = os.path.join(sub, f"{image_id}.jpg")
        if os.path.isfile(os.path.join(image_root, rel)):
            return rel
    return f"{image_id}.jpg"


def vg_documents(path: str, image_root: str, source: str) -> Iterator[Document | Skip]:
    """Visual Genome `region_descriptions.json`: [{"id", "regions": [{"phrase", "x", "y", "width", "height"}]}]."""
    for i, item in load_items(path):
        if isinstance(item, Skip):
            yield item
            continue
        regions = field(item, "regions", path, i, list)
        image_id = item.get("id", item.get("image_id", i))
        try:
            turns = [(r["phrase"], (r["x"], r["y"], r["width"], r["height"])) for r in regions]
        except (KeyError, TypeError) as e:
            raise DataError(
                f"annotation item {i}: a region without phrase, x, y, width, height ({path}: {e})"
            ) from None
        yield grounding_document(i, vg_image(image_id, image_root), turns, image_root, source)


def read_documents(
    fmt: str, path: str, image_root: str, *, source: str, caption_format: str = "albef-json",
    split: str | None = "train", frames: int = 8,
) -> Iterator[Document | Skip]:  # fmt: skip
    """Documents of `path` in `fmt` (DOCUMENT_FORMATS), in source order, and the skipped ones."""
    if fmt not in DOCUMENT_FORMATS:
        raise DataError(f"unknown document format ({fmt!r}); choose one of {list(DOCUMENT_FORMATS)}")
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found ({path}); check --input")
    if not os.path.isdir(image_root):
        raise DataError(f"image root not found ({image_root}); pass --image-root DIR")
    if fmt == "caption":
        return caption_documents(path, image_root, source, caption_format)
    if fmt == "grounding":
        if path.endswith(".p"):
            return refcoco_documents(path, image_root, source, split)
        return vg_documents(path, image_root, source)
    options = {"frames": frames} if fmt == "video" else {}
    return item_documents(fmt, path, image_root, source, **options)
