"""Convert image-caption annotations (ALBEF/VLMo JSON, COCO captions, CSV/TSV) into webdataset shards.

Each output sample holds `jpg` (image bytes), `txt` (the caption) and `json` (source, id, original path).
Bad input never aborts a run: each bad sample is skipped, counted by reason in the manifest and named
in skipped.jsonl. Input that cannot be read at all (no annotation file, not JSON, no image root) raises
DataError before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import random
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from eve_ds.data.manifest import DataError
from eve_ds.data.writer import ShardStats, build_shards, shard_name, write_tar

FORMATS = ("albef-json", "coco", "csv")


@dataclass
class Record:
    """One image-caption pair as read from the annotations (before any image is opened)."""

    index: int  # position in the input, after a caption list was expanded into pairs
    image: str  # path as written in the annotations, relative to the image root
    caption: str
    id: str


@dataclass
class ImageOptions:
    image_root: str
    source: str
    resize_short_side: int | None = None  # re-encode with the shorter side at most this many pixels
    jpeg_quality: int = 90
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit


class SkipSample(Exception):
    """A bad input sample; args[0] is the reason it is counted under."""


# ---------------------------------------------------------------------------------------------------
# Annotation readers -> list[Record]


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(
            f"the annotation file is not JSON ({path}: {e}); give --format csv for a CSV/TSV file, or fix it"
        ) from None


def read_albef_json(path: str) -> list[Record]:
    """ALBEF/VLMo list `[{"image": "rel/path.jpg", "caption": str | list[str]}, ...]`."""
    items = _load_json(path)
    if not isinstance(items, list):
        raise DataError(
            f"the annotation file is not a JSON list ({path}); --format albef-json expects "
            '[{"image": ..., "caption": ...}, ...], --format coco a COCO captions file'
        )
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise DataError(
                f"annotation item {i} has no image and caption ({path}: {str(item)[:80]}); --format "
                'albef-json expects [{"image": ..., "caption": ...}, ...]'
            )
        captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
        for c in captions:
            records.append(Record(len(records), item["image"], c, str(item.get("image_id", i))))
    return records


def read_coco(path: str) -> list[Record]:
    """COCO captions annotation JSON (`images` with id/file_name, `annotations` with image_id/caption)."""
    data = _load_json(path)
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        return [
            Record(i, files[a["image_id"]], a["caption"], str(a.get("id", i)))
            for i, a in enumerate(data["annotations"])
        ]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"not a COCO captions file ({path}: {type(e).__name__} {e}); --format coco expects "
            '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'
        ) from None


def read_csv(
    path: str, image_column: str = "image", caption_column: str = "caption", delimiter: str | None = None
) -> list[Record]:
    """CSV/TSV with a header row; the delimiter defaults to tab for .tsv files, else comma.

    Bytes that are not UTF-8 are kept as surrogates so the bad caption is counted, not fatal.
    """
    delimiter = delimiter or ("\t" if path.endswith(".tsv") else ",")
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"the CSV file has no column(s) {missing} ({path}: columns {reader.fieldnames}); pass "
                "--image-column and --caption-column"
            )
        return [
            Record(i, row[image_column], row[caption_column] or "", str(i)) for i, row in enumerate(reader)
        ]


def read_records(fmt: str, path: str, **csv_options) -> list[Record]:
    if fmt not in FORMATS:
        raise DataError(f"unknown annotation format ({fmt!r}); choose one of {list(FORMATS)}")
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found ({path}); check --input")
    if fmt == "csv":
        return read_csv(path, **csv_options)
    return read_albef_json(path) if fmt == "albef-json" else read_coco(path)


def _suffixes(path: str) -> list[str]:
    """ "a/b/c.jpg" -> ["a/b/c.jpg", "b/c.jpg", "c.jpg"]."""
    parts = os.path.normpath(path).replace(os.sep, "/").strip("/").split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


class ExcludeList:
    """Images to leave out, one path or basename a line (blank lines and # comments ignored).

    A line matches an image when one path is a path-suffix of the other: "COCO_val2014_42.jpg" and
    "val2014/COCO_val2014_42.jpg" match an annotation's "val2014/COCO_val2014_42.jpg" and vice versa.
    """

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            self.lines = {
                _suffixes(line)[0] for line in map(str.strip, f) if line and not line.startswith("#")
            }
        self.line_suffixes = {s for line in self.lines for s in _suffixes(line)}

    def __contains__(self, image: str) -> bool:
        suffixes = _suffixes(image)
        return suffixes[0] in self.line_suffixes or any(s in self.lines for s in suffixes)


# ---------------------------------------------------------------------------------------------------
# One sample


def clean_caption(caption: str) -> str:
    text = " ".join(caption.split())
    if not text:
        raise SkipSample("empty_caption")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates from undecodable input bytes
        raise SkipSample("undecodable_text") from None
    return text


def load_image(path: str, opts: ImageOptions) -> tuple[bytes, str | None]:
    """JPEG bytes of the image at `path` and the mode it was converted from (None if already RGB).

    The original bytes are kept when the file is an RGB JPEG that needs no resizing.
    """
    if not os.path.isfile(path):
        raise SkipSample("missing_file")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, opts.max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the pixel limit; such an image is just as suspicious.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _encode(img, path, opts)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample("decompression_bomb") from None
    except (OSError, SyntaxError, ValueError):  # unidentified, truncated or corrupt
        raise SkipSample("unreadable_image") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _encode(img: Image.Image, path: str, opts: ImageOptions) -> tuple[bytes, str | None]:
    converted = None if img.mode == "RGB" else img.mode
    short = min(img.size)
    resize = opts.resize_short_side is not None and short > opts.resize_short_side
    if img.format == "JPEG" and not converted and not resize:
        with open(path, "rb") as f:
            return f.read(), None
    rgb = img.convert("RGB")
    if resize:
        scale = opts.resize_short_side / short
        rgb = rgb.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), converted


def sample_key(source: str, index: int) -> str:
    # webdataset splits a member name at its first dot, so a key must not contain one.
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', source)}-{index:09d}"


def encode_record(rec: Record, opts: ImageOptions) -> tuple[dict, str | None]:
    """The webdataset sample for `rec` and the image mode converted from; raises SkipSample."""
    text = clean_caption(rec.caption)
    jpg, converted = load_image(os.path.join(opts.image_root, rec.image), opts)
    key = sample_key(opts.source, rec.index)
    meta = {"source": opts.source, "id": rec.id, "path": rec.image, "key": key}
    sample = {
        "__key__": key,
        "jpg": jpg,
        "txt": text.encode("utf-8"),
        "json": json.dumps(meta).encode("utf-8"),
    }
    return sample, converted


def skipped_input(input_path: str, rec: Record, reason: str) -> dict:
    """The skipped.jsonl line of a record that gave no sample."""
    return {"input": input_path, "index": rec.index, "id": rec.id, "image": rec.image, "reason": reason}


def convert_shard(
    index: int, records: list[Record], path: str, opts: ImageOptions, input_path: str = ""
) -> ShardStats:
    """Shard job: write the good samples of `records` to `path`, counting and naming the bad ones."""
    stats = ShardStats(shard_name(index))

    def samples():
        for rec in records:
            try:
                sample, converted = encode_record(rec, opts)
            except SkipSample as e:
                stats.skipped[e.args[0]] += 1
                stats.skipped_inputs.append(skipped_input(input_path, rec, e.args[0]))
                continue
            if converted:
                stats.converted[converted] += 1
            stats.sources[opts.source] += 1
            yield sample

    stats.num_samples = write_tar(path, samples())
    return stats


# ---------------------------------------------------------------------------------------------------
# Whole conversion


def make_shards(
    fmt: str,
    input_path: str,
    image_root: str,
    output: str,
    *,
    samples_per_shard: int = 1000,
    exclude: str | None = None,
    source: str | None = None,
    workers: int = 1,
    resize_short_side: int | None = None,
    seed: int = 0,
    csv_options: dict | None = None,
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
) -> dict:
    """Convert annotations to shards in `output`; returns the manifest (also written as manifest.json).

    Records are shuffled with `seed` before being cut into shards (so the captions of one image do not
    sit side by side in a shard); the assignment is deterministic, which lets a restarted run continue.
    """
    records = read_records(fmt, input_path, **(csv_options or {}))
    if not os.path.isdir(image_root):
        raise DataError(
            f"image root not found ({image_root}); pass --image-root DIR, the directory the annotation's "
            "image paths are relative to"
        )
    source = source or os.path.splitext(os.path.basename(input_path))[0]
    records, left_out = _exclude(records, exclude, os.path.abspath(input_path))
    excluded = len(left_out)
    random.Random(seed).shuffle(records)
    jobs = [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)] or [[]]
    opts = ImageOptions(image_root, source, resize_short_side, max_image_pixels=max_image_pixels)
    fingerprint = {
        "format": fmt,
        "input": os.path.abspath(input_path),
        "num_records": len(records),
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "excluded": excluded,
        "image_options": dataclasses.asdict(opts),
    }
    fingerprint["image_options"]["image_root"] = os.path.abspath(image_root)
    return build_shards(
        output,
        jobs,
        functools.partial(convert_shard, opts=opts, input_path=fingerprint["input"]),
        workers=workers,
        fingerprint=fingerprint,
        extra_skipped={"excluded": excluded} if excluded else {},
        skipped_inputs=left_out,
        desc=f"{source} shards",
    )


def _exclude(records: list[Record], exclude: str | None, input_path: str) -> tuple[list[Record], list[dict]]:
    """(records kept, skipped.jsonl lines of those the exclude list leaves out)."""
    if not exclude:
        return records, []
    if not os.path.isfile(exclude):
        raise DataError(f"exclude list not found ({exclude}); check --exclude")
    names = ExcludeList(exclude)
    kept, left_out = [], []
    for r in records:
        if r.image in names:
            left_out.append(skipped_input(input_path, r, "excluded"))
        else:
            kept.append(r)
    return kept, left_out
