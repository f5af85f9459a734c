"""EVLM's packed rows: the webdataset row format, the offline packer, `collate_packed` and the training loader.

One row is one webdataset sample; the documents packed into it are never split (the packer runs offline, when
the shards are written, greedily in source order up to a token and an image budget):

    {key}.json      {"version": 1, "num_tokens": N, "num_media_tokens": K, "samples": [
                       {"kind": "caption|interleaved|vqa|grounding|ocr|sft|video", "source", "id",
                        "segments": [{"text": "...", "loss": true}, {"image": "img0.jpg"},
                                     {"video": ["vid0.f00.jpg", ...], "fps": 1},
                                     {"role": "user", "text": "...", "loss": false}, ...]}]}
    {key}.img0.jpg ... {key}.vid0.f00.jpg ...      the image bytes the segments name

Tokens of a document (`document_layout`): each text segment tokenized alone (no special tokens), K media
placeholders per image or video frame, and an end-of-sequence token after every assistant turn and at the
end of the document [ours], labelled like the text it closes. `num_tokens` is that count for the whole row,
so a reader with another tokenizer or K is told at the first row rather than trained on the wrong ids.

`collate_packed` turns rows into the batch `EVLMModel` reads (see its docstring): the `stack_rows` fields of
`models/evlm/masks.py` (position ids restarting per document, the [lo, hi] slot interval of every token),
`images` uint8 (N, 3, S, S) with `image_slot` (N, 2) = (row, slot), `num_slots`, and `num_skipped` /
`skipped`. An image that cannot be read becomes a grey image and its document's labels -100: the row keeps
its shape, and the image is counted (and named, as `data/skipped.py` logs them).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eve_ds.data.config import DataConfig
from eve_ds.data.documents import check_segment
from eve_ds.data.manifest import DataError, existing_shards
from eve_ds.data.pipeline import (
    Placement,
    TrainLoader,
    continue_or_reseed,
    corpus_shards,
    fill_batches,
    load_corpus,
)
from eve_ds.data.skipped import Skipped
from eve_ds.data.stream import Corpus, ShardStream
from eve_ds.data.transforms import crop_resize
from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.utils.image import normalize_image

VERSION = 1
GREY = 128


class BadRow(DataError):
    """A row that cannot be read at all (no JSON, malformed JSON, an unknown segment kind): the training
    stream skips it (its slot is refilled, as for a bad EVE sample); a direct call raises it."""


# ---------------------------------------------------------------------------------------------------
# Tokens of a document


def eos_id(tokenizer) -> int | None:
    """The id closing a document: the tokenizer's EOS, else its SEP (BERT), else none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return v
    return 0


def document_layout(segments: list[dict], tokenizer, num_media_tokens: int, where: str = "") -> list[dict]:
    """Segments with text -> `layout_row` segments: {"text": ids, "loss"}, {"image": 0}, {"video": frames}."""
    kinds = [check_segment(s, f"{where} segment {j}") for j, s in enumerate(segments)]
    texts = [s["text"] for s, k in zip(segments, kinds) if k == "text"]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    end = eos_id(tokenizer)
    out: list[dict] = []
    for j, (seg, kind) in enumerate(zip(segments, kinds)):
        if kind == "text":
            tokens = list(next(ids))
            if end is not None and (seg.get("role") == "assistant" or j == len(segments) - 1):
                tokens.append(end)
            out.append({"text": tokens, "loss": bool(seg.get("loss", True))})
        elif kind == "image":
            out.append({"image": 0})
        else:
            out.append({"video": len(seg["video"])})
    return out


def layout_size(layout: list[dict], num_media_tokens: int) -> tuple[int, int]:
    """(tokens, image slots) of a `document_layout`."""
    slots = sum(1 if "image" in s else s.get("video", 0) for s in layout)
    return sum(len(s["text"]) for s in layout if "text" in s) + slots * num_media_tokens, slots


# ---------------------------------------------------------------------------------------------------
# Offline packing


@dataclass
class Packing:
    rows: list[list[int]] = field(default_factory=list)  # document indices per row, in source order
    too_long: list[int] = field(default_factory=list)  # documents over a budget alone (skipped)


def pack(sizes: Iterable[tuple[int, int]], pack_tokens: int, max_images: int) -> Packing:
    """Greedy in source order: a document goes into the current row while both budgets hold, else it opens
    the next row. Never split; a document over a budget on its own is left out (`too_long`)."""
    out, tokens, images = Packing(), 0, 0
    for i, (n, m) in enumerate(sizes):
        if n > pack_tokens or m > max_images:
            out.too_long.append(i)
            continue
        if not out.rows or tokens + n > pack_tokens or images + m > max_images:
            out.rows.append([])
            tokens, images = 0, 0
        out.rows[-1].append(i)
        tokens, images = tokens + n, images + m
    return out


def row_members(docs: list[dict], images: list[list[bytes]]) -> tuple[list[dict], dict[str, bytes]]:
    """Documents (segments with source paths) and the bytes of each one's images, in segment order ->
    (the row's samples with member names, {member: bytes})."""
    members: dict[str, bytes] = {}
    samples, n_img, n_vid = [], 0, 0
    for doc, data in zip(docs, images):
        data = iter(data)
        segments = []
        for seg in doc["segments"]:
            seg = dict(seg)
            if "image" in seg:
                seg["image"] = f"img{n_img}.jpg"
                members[seg["image"]] = next(data)
                n_img += 1
            elif "video" in seg:
                seg["video"] = [f"vid{n_vid}.f{k:02d}.jpg" for k in range(len(seg["video"]))]
                members.update({name: next(data) for name in seg["video"]})
                n_vid += 1
            segments.append(seg)
        samples.append({**doc, "segments": segments})
    return samples, members


def encode_row(key: str, samples: list[dict], members: dict[str, bytes], num_tokens: int, k: int) -> dict:
    """The webdataset sample of one row."""
    meta = {"version": VERSION, "num_tokens": num_tokens, "num_media_tokens": k, "samples": samples}
    return {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"), **members}


# ---------------------------------------------------------------------------------------------------
# Reading rows back


@dataclass
class PackedRow:
    """One decoded row: its `layout_row` tensors, its images (3, S, S) uint8 in slot order, what was skipped."""

    key: str
    layout: dict[str, Tensor]
    images: list[Tensor]
    skipped: list[Skipped]


@dataclass(frozen=True)
class RowReader:
    """How rows become token ids and pixels: the tokenizer the shards were packed with, the model's media
    placeholder id and K, and the image size (resize the shorter side, centre crop: no augmentation)."""

    tokenizer: object
    media_token_id: int
    num_media_tokens: int
    image_size: int

    def image(self, data: bytes | None) -> tuple[Tensor, str | None]:
        """(3, S, S) uint8, and the reason when it had to be grey."""
        S = self.image_size
        if data is None:
            return torch.full((3, S, S), GREY, dtype=torch.uint8), "missing_image"
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                side = min(w, h)
                pixels = np.array(crop_resize(img, ((w - side) // 2, (h - side) // 2, side, side), S))
        except Exception:  # PIL raises many types for corrupt data; any of them means "unreadable"
            return torch.full((3, S, S), GREY, dtype=torch.uint8), "unreadable_image"
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), None

    def __call__(self, sample: dict) -> PackedRow:
        key, url = sample.get("__key__"), sample.get("__url__")
        meta = row_meta(sample)
        docs, images, skipped = [], [], []
        for d, doc in enumerate(meta["samples"]):
            where = f"{url or 'row'} key {key} sample {d}"
            layout = document_layout(doc.get("segments", []), self.tokenizer, self.num_media_tokens, where)
            names = [
                n for s in doc["segments"] for n in ([s["image"]] if "image" in s else s.get("video", []))
            ]
            bad = False
            for name in names:
                pixels, reason = self.image(sample.get(name))
                images.append(pixels)
                if reason:
                    skipped.append(Skipped(sample.get("__corpus__"), url, f"{key}.{name}", reason))
                    bad = True
            if bad:  # keep the row's shape; learn nothing from text that speaks of a grey image
                layout = [{**s, "loss": False} if "text" in s else s for s in layout]
            docs.append(layout)
        row = layout_row(docs, self.media_token_id, self.num_media_tokens)
        self.check_length(meta, len(row["input_ids"]), key, url)
        return PackedRow(key, row, images, skipped)

    def check_length(self, meta: dict, n: int, key: str | None, url: str | None) -> None:
        if meta.get("num_tokens") not in (None, n) and meta.get("num_media_tokens") == self.num_media_tokens:
            raise DataError(
                f"row {key} of {url or 'the shards'} was packed to {meta['num_tokens']} tokens, this tokenizer "
                f"gives {n}; read the shards with the tokenizer their manifest names (arguments.tokenizer)"
            )


def row_meta(sample: dict) -> dict:
    """The row's JSON; BadRow naming the shard and key when it is missing or not a packed row."""
    key, url = sample.get("__key__"), sample.get("__url__") or "row"
    try:
        meta = json.loads(sample["json"])
    except KeyError:
        raise BadRow(f"packed row without a json member ({url} key {key})") from None
    except ValueError as e:
        raise BadRow(f"packed row JSON does not parse ({url} key {key}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("samples"), list):
        raise BadRow(f"not a packed row ({url} key {key}): expected {{'version', 'samples': [...]}}")
    if meta.get("version") != VERSION:
        raise BadRow(
            f"packed row version {meta.get('version')!r} ({url} key {key}); this code reads {VERSION}"
        )
    return meta


def collate_rows(rows: list[PackedRow], pad: int, bad: list[Skipped] = ()) -> dict:
    """Decoded rows -> the batch (module docstring); `bad`: rows of the block that were skipped whole."""
    batch = stack_rows([r.layout for r in rows], pad_id=pad)
    images = [im for r in rows for im in r.images]
    batch["images"] = torch.stack(images) if images else torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    batch["image_slot"] = torch.tensor(
        [(b, m) for b, r in enumerate(rows) for m in range(len(r.images))], dtype=torch.long
    ).reshape(-1, 2)
    batch["num_slots"] = int(batch["clip_of_slot"].shape[1])
    skipped = [*bad, *(s for r in rows for s in r.skipped)]
    batch["num_skipped"], batch["skipped"] = len(skipped), skipped
    batch["key"] = [r.key for r in rows]
    return batch


def collate_packed(
    samples: list[dict], *, tokenizer, media_token_id: int, num_media_tokens: int, image_size: int
) -> dict:
    """Raw webdataset samples of packed rows ({"__key__", "json", "img0.jpg", ...}) -> the model's batch."""
    reader = RowReader(tokenizer, media_token_id, num_media_tokens, image_size)
    return collate_rows([reader(s) for s in samples], pad_id(tokenizer))


MODEL_KEYS = ("input_ids", "labels", "position_ids", "lo", "hi", "valid", "image_slot", "num_slots")


def model_inputs(batch: dict, dtype: torch.dtype = torch.float32, mean=None, std=None) -> dict:
    """The tensors `EVLMModel.forward` reads, the uint8 images normalised (`data.image_mean` / `image_std`)."""
    return {**{k: batch[k] for k in MODEL_KEYS}, "images": normalize_image(batch["images"], dtype, mean, std)}


def trainer_batch(batch: dict) -> dict:
    """The batch under the trainer's keys: `transforms.batch_to_device` normalises `image` (the uint8
    images), and the `caption_lm` objective hands it to the model as `images`; `skipped` stays for the
    loader's SkipLog."""
    return {**{k: batch[k] for k in MODEL_KEYS}, "image": batch["images"], "skipped": batch["skipped"]}


# ---------------------------------------------------------------------------------------------------
# Training stream: 1 slot = 1 row of the exactly resumable stream


def read_stage(samples: Iterator[dict], reader: RowReader) -> Iterator[dict]:
    """{"row": PackedRow} per raw sample; a BadRow becomes a bad-sample marker (refilled by fill_batches)."""
    for s in samples:
        if "__bad__" in s:
            yield s
            continue
        try:
            yield {"row": reader(s)}
        except BadRow as e:
            yield {"__bad__": "bad_row", "__corpus__": s.get("__corpus__"), "__url__": s.get("__url__"),
                   "__key__": s.get("__key__"), "error": str(e)}  # fmt: skip


def collate_stage(batches: Iterator[tuple[list[dict], list[tuple]]], pad: int) -> Iterator[dict]:
    for samples, bad in batches:
        yield collate_rows([s["row"] for s in samples], pad, [Skipped(*b) for b in bad])


class PackedStream(ShardStream):
    """Batches of packed rows for this rank, in the order of `stream.raw_stream` (as `TrainStream`)."""

    def __init__(
        self, corpora: list[Corpus], cfg: DataConfig, at: Placement, reader: RowReader, *, seed, start_batch
    ):
        super().__init__()
        self.corpora, self.cfg, self.reader, self.seed, self.start_batch = (
            corpora,
            cfg,
            reader,
            seed,
            start_batch,
        )
        self.batch_size, self.rank, self.world_size = at.batch_size, at.rank, at.world_size

    def stages(self, stream: int) -> list:
        return [
            functools.partial(read_stage, reader=self.reader),
            functools.partial(fill_batches, batch_size=self.batch_size),
            functools.partial(collate_stage, pad=pad_id(self.reader.tokenizer)),
        ]


def build_packed_loader(
    cfg: DataConfig, reader: RowReader, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
    start_batch: int = 0, saved_layout: dict | None = None,
) -> TrainLoader:  # fmt: skip
    """Infinite batches of the packed corpora of `cfg.train`, continuing after `start_batch` batches (the
    same contract as `pipeline.build_train_loader`: the same arguments give the same batches)."""
    if not cfg.train:
        raise DataError("data.train is empty; list the packed shard directories made by eve-make-shards")
    corpora = [load_corpus(c.name, c.shards, c.weight, c.manifest, c.subset) for c in cfg.train]
    layout, seed, start_batch = continue_or_reseed(
        corpora, cfg, batch_size, world_size, seed, start_batch, saved_layout
    )
    at = Placement(reader.image_size, 0, batch_size, rank, world_size)
    dataset = PackedStream(corpora, cfg, at, reader, seed=seed, start_batch=start_batch)
    return TrainLoader(dataset, cfg.num_workers, layout)


# ---------------------------------------------------------------------------------------------------
# Validation: every row of held-out shards once, in file order


class PackedValStream(IterableDataset):
    """The rows of `urls` in file order, row i to stream i mod (ranks x workers), in batches of B (the last
    may be smaller). A row that cannot be read is left out and counted in the next batch's `num_skipped`."""

    def __init__(self, urls: list[str], reader: RowReader, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.urls, self.reader, self.batch_size = urls, reader, batch_size
        self.rank, self.world_size = rank, world_size

    def rows(self, stream: int, num_streams: int) -> Iterator[PackedRow | None]:
        raw = (
            s
            for url in self.urls
            for s in wds.tariterators.tarfile_samples([{"url": url}], handler=wds.warn_and_continue)
        )
        for sample in itertools.islice(raw, stream, None, num_streams):
            try:
                yield self.reader(sample)
            except BadRow:
                yield None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows = self.rows(self.rank * workers + worker, self.world_size * workers)
        while block := list(itertools.islice(rows, self.batch_size)):
            good = [r for r in block if r is not None]
            if good:
                batch = collate_rows(good, pad_id(self.reader.tokenizer))
                batch["num_skipped"] += len(block) - len(good)
                yield batch


def build_packed_val_loader(
    spec: str, reader: RowReader, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """Deterministic batches of the packed rows of `spec` (a shard directory or brace spec), each row once
    over all ranks."""
    urls = existing_shards(corpus_shards(spec, subset=True)[0], "validation")
    dataset = PackedValStream(urls, reader, batch_size, rank, world_size)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
