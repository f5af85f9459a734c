"""Atomic, resumable writing of webdataset shards and their manifest.

Work is split into numbered shard jobs fixed before any is run (deterministic assignment of samples to
shards), so a restarted run only redoes the jobs whose shard is not complete. A job writes its tar under
a temporary name, then its statistics to `_stats/<shard>.json`, then renames the tar: a shard is complete
exactly when `<shard>.tar` exists, and a reader never sees a half-written one.

Next to the manifest, `skipped.jsonl` names every input that gave no sample: one JSON object a line,
{"input": annotation file, "index": record index, "id", "image": path as annotated, "reason"}, sorted by
input and index (empty when nothing was skipped).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tqdm import tqdm
from webdataset import TarWriter

from eve_ds.data.manifest import MANIFEST, DataError
from eve_ds.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STATS_DIR = "_stats"
SKIPPED = "skipped.jsonl"


@dataclass
class ShardStats:
    """What one shard job wrote and what it skipped or converted, by reason."""

    name: str
    num_samples: int = 0
    sources: collections.Counter = field(default_factory=collections.Counter)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    converted: collections.Counter = field(default_factory=collections.Counter)
    skipped_inputs: list[dict] = field(default_factory=list)  # the lines of skipped.jsonl

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "sources": dict(self.sources),
            "skipped": dict(self.skipped),
            "converted": dict(self.converted),
            "skipped_inputs": self.skipped_inputs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShardStats:
        return cls(
            d["name"],
            d["num_samples"],
            *(collections.Counter(d[k]) for k in ("sources", "skipped", "converted")),
            d.get("skipped_inputs", []),  # statistics written before the inputs were named
        )


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_tar(path: str, samples: Iterable[dict]) -> int:
    """Write samples ({"__key__": str, ext: bytes}) to a tar at `path`; returns the number written.

    Member mtimes, owners and modes are fixed so the same samples give a bitwise-identical file. The mtime
    is an int: a float one makes tarfile write a PAX header per member, which every reader then parses
    (about a tenth of the in-process pipeline's time at 224 px, measured with cProfile).
    """
    n = 0
    with open(path, "wb") as f, TarWriter(f, user="", group="", mtime=0, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
            n += 1
    return n


JobFn = Callable[[int, object, str], ShardStats]


def _run_job(job_fn: JobFn, output: str, item: tuple[int, object]) -> ShardStats:
    index, job = item
    final = os.path.join(output, shard_name(index))
    stats = job_fn(index, job, final + ".partial")
    # Statistics first, rename last: a shard with a final name always has its statistics.
    atomic_write_json(os.path.join(output, STATS_DIR, stats.name + ".json"), stats.to_dict())
    os.replace(final + ".partial", final)
    return stats


def _check_arguments(output: str, fingerprint: dict) -> None:
    """Refuse to continue a run in `output` that was started with different arguments."""
    path = os.path.join(output, STATS_DIR, "arguments.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != fingerprint:
            changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            raise DataError(
                f"the output directory holds shards made with other arguments ({output}: "
                f"{', '.join(changed)} differ); use an empty --output directory"
            )
    else:
        atomic_write_json(path, fingerprint)


def _done_stats(output: str, index: int) -> ShardStats | None:
    name = shard_name(index)
    stats = os.path.join(output, STATS_DIR, name + ".json")
    if os.path.exists(os.path.join(output, name)) and os.path.exists(stats):
        with open(stats, encoding="utf-8") as f:
            return ShardStats.from_dict(json.load(f))
    return None


def _remove_leftovers(output: str) -> None:
    for name in os.listdir(output):
        if ".tmp" in name or name.endswith(".partial"):
            os.remove(os.path.join(output, name))


def build_shards(
    output: str,
    jobs: list,
    job_fn: JobFn,
    *,
    workers: int = 1,
    fingerprint: dict,
    extra_skipped: dict | None = None,
    skipped_inputs: list[dict] | None = None,
    desc: str = "shards",
) -> dict:
    """Run `job_fn(i, jobs[i], path)` for every shard not yet complete; write the manifest and skipped.jsonl.

    `job_fn` must write the shard's tar to `path` and return its ShardStats; it must be
    picklable (a module-level function or a functools.partial of one) when workers > 1.
    `extra_skipped` counts samples dropped before sharding (e.g. excluded images), `skipped_inputs`
    names them.
    """
    try:
        os.makedirs(os.path.join(output, STATS_DIR), exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(
            f"a file is in the way of the output directory ({output}); give a directory as --output"
        ) from None
    _check_arguments(output, fingerprint)
    _remove_leftovers(output)
    done = {i: s for i in range(len(jobs)) if (s := _done_stats(output, i)) is not None}
    todo = [(i, jobs[i]) for i in range(len(jobs)) if i not in done]
    if done:
        log.info(
            "%s: %d of %d shards already complete; continuing with the rest", output, len(done), len(jobs)
        )
    run = functools.partial(_run_job, job_fn, output)
    with tqdm(total=len(todo), desc=desc, unit="shard", disable=not todo) as bar:
        if workers > 1 and len(todo) > 1:
            # Spawned, not forked: a fork of a process that runs threads (torch's, a tokenizer's, a test
            # runner's) can copy a held lock into the child, which then waits on it forever.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for stats in pool.imap_unordered(run, todo):
                    done[_index(stats.name)] = stats
                    bar.update()
        else:
            for item in todo:
                done[item[0]] = run(item)
                bar.update()
    shards = [done[i] for i in range(len(jobs))]
    write_skipped(os.path.join(output, SKIPPED), [*(skipped_inputs or []), *_inputs_of(shards)])
    manifest = make_manifest(shards, extra_skipped or {}, fingerprint)
    atomic_write_json(os.path.join(output, MANIFEST), manifest)
    return manifest


def _inputs_of(shards: list[ShardStats]) -> list[dict]:
    return [item for s in shards for item in s.skipped_inputs]


def write_skipped(path: str, items: list[dict]) -> None:
    """skipped.jsonl: one object a line, sorted by (input, index) -- the annotation file's order."""
    items = sorted(items, key=lambda d: (str(d.get("input")), d.get("index", -1)))
    atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items))


def _index(name: str) -> int:
    return int(name[len("shard-") : -len(".tar")])


def make_manifest(shards: list[ShardStats], extra_skipped: dict, arguments: dict) -> dict:
    total = ShardStats("total")
    for s in shards:
        total.num_samples += s.num_samples
        total.sources.update(s.sources)
        total.skipped.update(s.skipped)
        total.converted.update(s.converted)
    total.skipped.update(extra_skipped)
    last = len(shards) - 1
    return {
        "num_samples": total.num_samples,
        "shards": [{"name": s.name, "num_samples": s.num_samples} for s in shards],
        "spec": f"shard-{{000000..{last:06d}}}.tar" if last > 0 else shard_name(0),
        "sources": dict(sorted(total.sources.items())),
        "skipped": dict(sorted(total.skipped.items())),
        "converted": dict(sorted(total.converted.items())),
        "arguments": arguments,
    }


def summary(manifest: dict, output: str | None = None) -> str:
    """One paragraph for the log at the end of a run; with `output`, where the skipped inputs are named."""
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()) or "none"
    if manifest["skipped"] and output is not None:
        skipped += f" (each named in {os.path.join(output, SKIPPED)})"
    converted = ", ".join(f"{k}={v}" for k, v in manifest["converted"].items()) or "none"
    return (
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards; "
        f"sources: {manifest['sources']}; skipped: {skipped}; converted to RGB: {converted}"
    )


def check_not_empty(manifest: dict, output: str) -> None:
    """Raise DataError when the shards in `output` hold no sample: a training run could not use them."""
    if manifest["num_samples"]:
        return
    where = os.path.join(output, MANIFEST)
    skipped = manifest["skipped"]
    if not skipped:
        raise DataError(
            f"the corpus is empty: the input holds no image-caption records ({where}); check --input and "
            "--format"
        )
    reasons = ", ".join(f"{k}={v}" for k, v in skipped.items())
    hint = "check --image-root" if "missing_file" in skipped else "fix the inputs it lists"
    raise DataError(
        f"the corpus is empty: all {sum(skipped.values())} inputs were skipped ({reasons}; "
        f"{where}); each is named in {os.path.join(output, SKIPPED)}: {hint}"
    )
