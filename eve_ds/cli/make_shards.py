"""Convert image-caption annotations into webdataset shards with a manifest, or pack documents into EVLM rows.

    python tools/make_shards.py --format coco --input annotations/captions_train2014.json \
        --image-root coco/ --output shards/coco --exclude test_images.txt --workers 8
    eve-make-shards --format interleaved --input mmc4/docs_shard_0.jsonl --image-root mmc4/images \
        --output shards/mmc4 --tokenizer LM_DIR --pack-tokens 2048 --max-images 64 --media-tokens 16

--format interleaved|caption|vqa|grounding|sft|video writes packed rows (docs/evlm.md, "Data").

Every input that gave no sample is named, with its reason, in OUTPUT/skipped.jsonl. Exit 2 with one line
on stderr for unusable input (--debug: with its traceback) and when the corpus comes out empty.
"""

from __future__ import annotations

import argparse
import logging
import sys

from eve_ds.data.documents import DOCUMENT_FORMATS
from eve_ds.data.packed_shards import make_packed_shards
from eve_ds.data.sources import FORMATS, make_shards
from eve_ds.data.writer import check_not_empty, summary
from eve_ds.utils.errors import cli_main

log = logging.getLogger("make_shards")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-make-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--format", required=True, choices=FORMATS + DOCUMENT_FORMATS)
    p.add_argument(
        "--input", required=True, help="annotation file (JSON list, JSON lines, COCO JSON, CSV/TSV)"
    )
    p.add_argument("--image-root", default=".", help="directory the image paths are relative to")
    p.add_argument("--output", required=True, help="directory for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--exclude", help="file of image paths or basenames to leave out, one a line")
    p.add_argument("--source", help="source name stored with each sample (default: input file stem)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--resize-short-side", type=int, help="re-encode images larger than this (e.g. 384)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    p.add_argument("--image-column", default="image", help="csv: column of image paths")
    p.add_argument("--caption-column", default="caption", help="csv: column of captions")
    p.add_argument("--delimiter", help="csv: field delimiter (default: tab for .tsv, else comma)")
    packed = p.add_argument_group("packed EVLM rows (--format " + "|".join(DOCUMENT_FORMATS) + ")")
    packed.add_argument("--tokenizer", help="a local tokenizer folder (AutoTokenizer), the LM's")
    packed.add_argument("--pack-tokens", type=int, default=2048, help="tokens per row at most [paper: 2048]")
    packed.add_argument(
        "--max-images", type=int, default=64, help="images (frames) per row at most [paper: 64]"
    )
    packed.add_argument("--media-tokens", type=int, default=16, help="placeholders per image [paper: 16]")
    packed.add_argument("--caption-format", default="albef-json", choices=FORMATS, help="caption: the layout")
    packed.add_argument(
        "--split", default="train", help="grounding, RefCOCO: the refs split ('all': every one)"
    )
    packed.add_argument("--frames", type=int, default=8, help="video: frames taken per folder [ours: 8]")
    args = p.parse_args(argv)
    if args.samples_per_shard < 1 or args.workers < 1:
        p.error("--samples-per-shard and --workers must be >= 1")
    if args.format in DOCUMENT_FORMATS and not args.tokenizer:
        p.error(f"--format {args.format} packs tokens: give --tokenizer DIR (the LM's tokenizer folder)")
    return args


def packed(args: argparse.Namespace) -> dict:
    options = {
        "caption": {"caption_format": args.caption_format},
        "grounding": {"split": None if args.split == "all" else args.split},
        "video": {"frames": args.frames},
    }.get(args.format, {})
    return make_packed_shards(
        args.format, args.input, args.image_root, args.output, tokenizer=args.tokenizer,
        pack_tokens=args.pack_tokens, max_images=args.max_images, num_media_tokens=args.media_tokens,
        samples_per_shard=args.samples_per_shard, source=args.source, workers=args.workers,
        resize_short_side=args.resize_short_side, reader_options=options,
    )  # fmt: skip


@cli_main("eve-make-shards")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.format in DOCUMENT_FORMATS:
        manifest = packed(args)
        log.info("%s: %s", args.output, summary(manifest, args.output))
        check_not_empty(manifest, args.output)
        return 0
    csv_options = (
        {
            "image_column": args.image_column,
            "caption_column": args.caption_column,
            "delimiter": args.delimiter,
        }
        if args.format == "csv"
        else None
    )
    manifest = make_shards(
        args.format,
        args.input,
        args.image_root,
        args.output,
        samples_per_shard=args.samples_per_shard,
        exclude=args.exclude,
        source=args.source,
        workers=args.workers,
        resize_short_side=args.resize_short_side,
        seed=args.seed,
        csv_options=csv_options,
    )
    log.info("%s: %s", args.output, summary(manifest, args.output))
    check_not_empty(manifest, args.output)  # written, so it can be read, but not usable for training
    return 0


if __name__ == "__main__":
    sys.exit(main())
