"""Shard specs and manifests: which shards a corpus has and how many samples each holds.

A manifest (`manifest.json` next to the shards) is written by `make_shards` / `make_synthetic`:
`{"num_samples": int, "shards": [{"name": str, "num_samples": int}], "sources": {...},
"skipped": {reason: count}, ...}`. The loader uses the counts for epoch sizes and to skip whole shards
when it resumes. Shards made by img2dataset have no manifest; their `NNNNN_stats.json` files (or, as a
last resort, the tar headers) give the counts instead.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from eve_ds.utils.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class DataError(UserError, ValueError):
    """A corpus, shard or annotation file that cannot be used; the message names it and says what to do.

    A ValueError too, so callers that caught the ValueError this used to be still catch it."""


def expand_spec(spec: str) -> list[str]:
    """Brace-expand a shard spec ("a/{000..009}.tar", several joined by "::") into URLs."""
    return expand_urls(spec)


def read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"shard manifest is not JSON ({path}: {e}); make the shards again with eve-make-shards"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(
            f"shard manifest has no list of shards ({path}); it is not an eve-make-shards manifest"
        )
    return manifest


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _count_tar_samples(path: str) -> int:
    """Count samples (distinct keys) from the tar headers only; member data is skipped, not read."""
    keys = set()
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isreg():
                keys.add(base_plus_ext(info.name)[0])
    return len(keys)


def _img2dataset_count(url: str) -> int | None:
    stats = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
    if stats is None or not os.path.exists(stats):
        return None
    with open(stats, encoding="utf-8") as f:
        return int(json.load(f)["successes"])


def shard_counts(urls: list[str], manifest: str | None = None) -> list[int]:
    """Samples per shard for `urls`, from the manifest, img2dataset stats files or the tar headers.

    Raises ValueError for remote shards without a manifest (their counts cannot be read cheaply).
    """
    path = manifest or os.path.join(os.path.dirname(urls[0]), MANIFEST)
    if os.path.exists(path):
        by_name = {s["name"]: s["num_samples"] for s in read_manifest(path)["shards"]}
        missing = [u for u in urls if os.path.basename(u) not in by_name]
        if not missing:
            return [by_name[os.path.basename(u)] for u in urls]
        log.warning(
            "manifest %s does not list %d shard(s), e.g. %s; counting them", path, len(missing), missing[0]
        )
        return [by_name.get(os.path.basename(u)) or _count_one(u) for u in urls]
    return [_count_one(u) for u in urls]


def _count_one(url: str) -> int:
    if not _is_local(url):
        raise DataError(f"no manifest for a remote shard ({url}); set the corpus' manifest: path")
    n = _img2dataset_count(url)
    return n if n is not None else _count_tar_samples(url)


def existing_shards(urls: list[str], what: str) -> list[str]:
    """Drop local shards that do not exist, naming each one in a warning (remote URLs are kept)."""
    kept = []
    for u in urls:
        if _is_local(u) and not os.path.exists(u):
            log.warning("%s: shard %s is missing; skipping it", what, u)
            continue
        kept.append(u)
    return kept
