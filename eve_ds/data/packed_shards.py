"""`eve-make-shards --format interleaved|caption|vqa|grounding|sft|video`: documents -> packed row shards.

    read_documents    the annotations in their official layout, in source order (`documents.py`)
    document_layout   tokens per document with the --tokenizer (K media placeholders per image / frame)
    pack              greedy rows of <= --pack-tokens tokens and <= --max-images images, never a split document
    shard jobs        each row's images read and stored (`sources.load_image`: re-encoded only when needed)

Written through `writer.build_shards`: atomic shards, a restart redoes only the unfinished ones, and the
manifest's `arguments` (the fingerprint) record the tokenizer's name and the sha256 of its files, the
budgets and K. `num_samples` counts rows, `sources` documents. Skipped, each named in skipped.jsonl: a
document over a budget on its own (`document_too_long`, with its size), a missing or unreadable image (the
whole document is left out of its row: the row only gets shorter), and the readers' skips.
"""

from __future__ import annotations

import functools
import hashlib
import os

from eve_ds.data.documents import Document, Skip, read_documents
from eve_ds.data.manifest import MANIFEST, DataError, read_manifest
from eve_ds.data.packed import document_layout, encode_row, layout_size, pack, row_members
from eve_ds.data.pipeline import PACKAGED_TOKENIZERS, corpus_shards, load_tokenizer
from eve_ds.data.sources import ImageOptions, SkipSample, load_image, sample_key
from eve_ds.data.writer import ShardStats, build_shards, shard_name, write_tar

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
)  # fmt: skip
TOO_LONG = "document_too_long"


def tokenizer_record(name_or_path: str, tokenizer) -> dict:
    """What the fingerprint says of the tokenizer: its name, folder, size and the sha256 of its files."""
    path = os.path.normpath(PACKAGED_TOKENIZERS.get(name_or_path, name_or_path))
    digest = hashlib.sha256()
    files = sorted(f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f)))
    for name in files:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            digest.update(f.read())
    return {
        "name": os.path.basename(path),
        "path": os.path.abspath(path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "files": files,
        "sha256": digest.hexdigest(),
    }


def fingerprint_problems(key: str, spec: str, own: dict, num_media_tokens: int, where: str) -> list[str]:
    """Why the packed corpus `spec` (config key `key`) does not fit a model whose tokenizer is `own` (a
    `tokenizer_record`; `where`: the config key that names it) and K: one line each, naming both sides."""
    try:
        manifest = corpus_shards(spec, subset=True)[1] or os.path.join(spec, MANIFEST)
        args = read_manifest(manifest).get("arguments") or {}
    except (DataError, OSError) as e:
        return [f"{key}={spec!r}: {e}"]
    theirs = args.get("tokenizer")
    if not isinstance(theirs, dict) or "num_media_tokens" not in args:
        return [f"{key}={spec!r}: {manifest} is not a manifest of packed rows (eve-make-shards --format ...)"]
    problems = []
    if theirs.get("sha256") != own["sha256"]:
        problems.append(
            f"{key}: {manifest} was packed with the tokenizer {theirs.get('path')} (sha256 "
            f"{str(theirs.get('sha256'))[:12]}) but {where} has {own['path']} (sha256 {own['sha256'][:12]}); "
            f"make the shards again with --tokenizer {own['path']}"
        )
    if args["num_media_tokens"] != num_media_tokens:
        problems.append(
            f"{key}: {manifest} has {args['num_media_tokens']} media tokens per image but "
            f"model.num_media_tokens={num_media_tokens}; make the shards again with --media-tokens "
            f"{num_media_tokens}"
        )
    return problems


def skipped_line(input_path: str, skip: Skip | Document, reason: str, **extra) -> dict:
    image = getattr(skip, "image", None)
    return {
        "input": input_path,
        "index": skip.index,
        "id": skip.id,
        "image": image,
        "reason": reason,
        **extra,
    }


def media_paths(doc: dict) -> list[str]:
    return [p for s in doc["segments"] for p in ([s["image"]] if "image" in s else s.get("video", []))]


def encode_packed_shard(
    index: int, rows: list[tuple[int, list[tuple[dict, int, int]]]], path: str, opts: ImageOptions,
    num_media_tokens: int, input_path: str,
) -> ShardStats:  # fmt: skip
    """Shard job: rows = [(row index, [(document dict, tokens, its input index)])] -> one tar of rows."""
    stats = ShardStats(shard_name(index))

    def samples():
        for row_index, docs in rows:
            kept, images, tokens = [], [], 0
            for doc, n, doc_index in docs:
                try:
                    data = [load_image(os.path.join(opts.image_root, p), opts)[0] for p in media_paths(doc)]
                except SkipSample as e:
                    stats.skipped[e.args[0]] += 1
                    skip = Skip(doc_index, doc["id"], e.args[0], ",".join(media_paths(doc)))
                    stats.skipped_inputs.append(skipped_line(input_path, skip, e.args[0]))
                    continue
                kept.append(doc)
                images.append(data)
                tokens += n
                stats.sources[doc["source"]] += 1
            if kept:
                samples_, members = row_members(kept, images)
                yield encode_row(
                    sample_key(opts.source, row_index), samples_, members, tokens, num_media_tokens
                )

    stats.num_samples = write_tar(path, samples())
    return stats


def make_packed_shards(
    fmt: str, input_path: str, image_root: str, output: str, *, tokenizer: str, pack_tokens: int = 2048,
    max_images: int = 64, num_media_tokens: int = 16, samples_per_shard: int = 1000, source: str | None = None,
    workers: int = 1, resize_short_side: int | None = None, reader_options: dict | None = None,
) -> dict:  # fmt: skip
    """Pack the documents of `input_path` into row shards in `output`; returns the manifest (module doc)."""
    if pack_tokens < 1 or max_images < 0 or num_media_tokens < 1:
        raise DataError(
            f"--pack-tokens {pack_tokens}, --max-images {max_images}, --media-tokens {num_media_tokens}: "
            "expected >= 1, >= 0 and >= 1"
        )
    source = source or os.path.splitext(os.path.basename(input_path))[0]
    input_abs = os.path.abspath(input_path)
    tok = load_tokenizer(tokenizer)
    docs, skipped = [], []
    for d in read_documents(fmt, input_path, image_root, source=source, **(reader_options or {})):
        if isinstance(d, Skip):
            skipped.append(skipped_line(input_abs, d, d.reason))
        else:
            docs.append(d)
    sizes = [layout_size(document_layout(d.segments, tok, num_media_tokens), num_media_tokens) for d in docs]
    packing = pack(sizes, pack_tokens, max_images)
    for i in packing.too_long:
        skipped.append(skipped_line(input_abs, docs[i], TOO_LONG, tokens=sizes[i][0], images=sizes[i][1]))
    rows = [
        (r, [(docs[i].to_dict(), sizes[i][0], docs[i].index) for i in row])
        for r, row in enumerate(packing.rows)
    ]
    jobs = [rows[i : i + samples_per_shard] for i in range(0, len(rows), samples_per_shard)] or [[]]
    opts = ImageOptions(os.path.abspath(image_root), source, resize_short_side)
    fingerprint = {
        "format": fmt,
        "input": input_abs,
        "image_root": opts.image_root,
        "num_documents": len(docs),
        "pack_tokens": pack_tokens,
        "max_images": max_images,
        "num_media_tokens": num_media_tokens,
        "samples_per_shard": samples_per_shard,
        "resize_short_side": resize_short_side,
        "reader_options": reader_options or {},
        "tokenizer": tokenizer_record(tokenizer, tok),
    }
    counts: dict[str, int] = {}
    for line in skipped:
        counts[line["reason"]] = counts.get(line["reason"], 0) + 1
    job = functools.partial(
        encode_packed_shard, opts=opts, num_media_tokens=num_media_tokens, input_path=input_abs
    )
    return build_shards(
        output, jobs, job, workers=workers, fingerprint=fingerprint, extra_skipped=counts,
        skipped_inputs=skipped, desc=f"{source} packed shards",
    )  # fmt: skip
