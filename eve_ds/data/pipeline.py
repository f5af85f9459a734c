"""Training and validation loaders: webdataset stages from shards to batches.

Training, per (rank, worker) stream (see `stream.py` for the order of samples):

    raw_stream          mixed corpora, shard visits split by node and worker, shuffled per visit
    wds.map(augment)    decode + RandomResizedCrop + flip (per-slot seeded RNG); bad samples -> markers
    fill_batches        exactly batch_size slots per batch; bad slots refilled from the same batch
    wds.map(collate)    normalise, tokenize, pad -> the batch dict

Batching happens inside the worker and DataLoader(batch_size=None) takes the workers' batches round-
robin, so the loader's position is the number of batches this rank has consumed (`start_batch`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eve_ds.data.config import DataConfig
from eve_ds.data.manifest import (
    MANIFEST,
    DataError,
    existing_shards,
    expand_spec,
    read_manifest,
    shard_counts,
)
from eve_ds.data.skipped import SkipLog, skipped_of
from eve_ds.data.stream import Corpus, ShardStream
from eve_ds.data.synthetic import ensure_synthetic_corpus
from eve_ds.data.transforms import BadSample, collate, eval_transform, train_transform

log = logging.getLogger(__name__)

PACKAGED_TOKENIZERS = {
    "bert-base-uncased": os.path.join(os.path.dirname(__file__), "..", "assets", "bert-base-uncased")
}


def load_tokenizer(name_or_path: str = "bert-base-uncased"):
    """A transformers tokenizer from the packaged folder for `name_or_path`, else from that local path."""
    from transformers import AutoTokenizer

    # The tokenizer is used in forked DataLoader workers; its own thread pool would deadlock there.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = os.path.normpath(PACKAGED_TOKENIZERS.get(name_or_path, name_or_path))
    # A local folder needs no hub: without local_files_only transformers still probes it (seconds of
    # network time-outs on an offline machine).
    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))


def corpus_shards(
    spec: str, manifest: str | None = None, subset: bool = False
) -> tuple[list[str], str | None]:
    """(shard URLs, manifest path or None) of a corpus given as a shard directory or a brace spec.

    A directory lists its shards in its manifest; a brace spec must cover every shard of the manifest next
    to it (or named by `manifest`) unless `subset`, so that no part of a corpus is left out silently.
    """
    if _is_local_dir(spec):
        path = manifest or os.path.join(spec, MANIFEST)
        if not os.path.exists(path):
            raise DataError(
                f"shard directory without {MANIFEST} ({spec}); give a brace spec of its shards or make "
                "them with eve-make-shards"
            )
        names = [s["name"] for s in read_manifest(path)["shards"]]
        return [os.path.join(spec, n) for n in names], path
    urls = expand_spec(spec)
    path = manifest or os.path.join(os.path.dirname(urls[0]), MANIFEST)
    if not os.path.exists(path):
        return urls, None
    listed = [s["name"] for s in read_manifest(path)["shards"]]
    left_out = [n for n in listed if n not in {os.path.basename(u) for u in urls}]
    if left_out and not subset:
        raise DataError(
            f"{spec} leaves out {len(left_out)} of the {len(listed)} shards listed in {path}, e.g. "
            f"{left_out[:3]}; give the directory {os.path.dirname(path)} to read all of them, or set "
            f"subset: true on the corpus to read only these"
        )
    return urls, path


def _is_local_dir(spec: str) -> bool:
    return "{" not in spec and "::" not in spec and os.path.isdir(os.path.expanduser(spec))


def load_corpus(
    name: str, spec: str, weight: float = 1.0, manifest: str | None = None, subset: bool = False
) -> Corpus:
    """A corpus with its existing shards and their sample counts; missing shards are warned about.

    Raises DataError naming the corpus and `spec` when no shard exists or the shards hold no sample."""
    urls, manifest = corpus_shards(spec, manifest, subset)
    urls = existing_shards(urls, name)
    if not urls:
        raise DataError(
            f"corpus {name}: no shard exists ({spec}); check the corpus' shards: path, or make the shards "
            "with eve-make-shards"
        )
    counts = shard_counts(urls, manifest)
    if sum(counts) == 0:
        raise DataError(
            f"corpus {name} is empty: its {len(urls)} shard(s) hold no samples ({manifest or spec}); "
            "see skipped.jsonl next to the manifest for why every input was skipped"
        )
    return Corpus(name, urls, counts, weight)


def mixture(corpora: list[Corpus], global_batch_size: int) -> tuple[list[dict], int]:
    """What the stream will draw: per corpus {name, pairs, shards, weight, fraction}, and the number of
    optimizer steps in one epoch of the union (all pairs once, on average)."""
    total = sum(c.sampling_mass for c in corpora) or 1.0  # all empty: fractions 0
    rows = [
        {
            "name": c.name,
            "pairs": c.num_samples,
            "shards": len(c.urls),
            "weight": c.weight,
            "fraction": c.sampling_mass / total,
        }
        for c in corpora
    ]
    return rows, max(1, sum(c.num_samples for c in corpora) // global_batch_size)


def resolve_train_corpora(cfg: DataConfig, image_size: int) -> list[Corpus]:
    if cfg.synthetic:
        train, _ = ensure_synthetic_corpus(
            cfg.cache_dir, cfg.synthetic_num_train, cfg.synthetic_num_val, cfg.synthetic_seed, image_size
        )
        return [load_corpus("synthetic", train)]
    return [load_corpus(c.name, c.shards, c.weight, c.manifest, c.subset) for c in cfg.train]


def resolve_val_spec(cfg: DataConfig, image_size: int) -> str | None:
    """The validation shard spec: the synthetic corpus' val split when synthetic, else cfg.val."""
    if cfg.synthetic:
        return ensure_synthetic_corpus(
            cfg.cache_dir, cfg.synthetic_num_train, cfg.synthetic_num_val, cfg.synthetic_seed, image_size
        )[1]
    return cfg.val


# ---------------------------------------------------------------------------------------------------
# Stages


def augment(sample: dict, *, seed: int, stream: int, **transform) -> dict:
    """Decoded sample {"image", "text", "key"} or a bad marker {"__bad__": reason, "__corpus__", ...}."""
    if "__bad__" in sample:
        return sample
    rng = random.Random(f"{seed}/{stream}/{sample['__slot__']}")
    try:
        image, text = train_transform(sample, rng, **transform)
    except BadSample as e:
        keep = ("__corpus__", "__url__", "__key__")  # what the skip warning names
        return {"__bad__": e.args[0], **{k: sample.get(k) for k in keep}}
    return {"image": image, "text": text, "key": f"{sample['__corpus__']}/{sample['__key__']}"}


def fill_batches(samples: Iterator[dict], batch_size: int) -> Iterator[tuple[list[dict], list[tuple]]]:
    """(batch_size samples, the bad slots' (shard, key, reason)) from consecutive blocks of batch_size slots.

    A bad slot is refilled with a good sample of the same block (so the block, and the stream
    position, stay batch_size slots regardless of which samples turn out bad); a block with no good
    sample at all is dropped with a warning -- the one case in which resume is no longer exact.
    """
    bad = []  # the skipped samples travel with the batch: a worker process's own log may go nowhere
    while True:
        block = list(itertools.islice(samples, batch_size))
        good = [s for s in block if "__bad__" not in s]
        bad += skipped_of(block)
        if not good:
            log.warning("a whole block of %d samples was bad; taking the next one", batch_size)
            continue
        yield [good[i % len(good)] for i in range(batch_size)], bad
        bad = []


def collate_stage(
    batches: Iterator[tuple[list[dict], list[tuple]]], *, tokenizer, max_text_len: int
) -> Iterator[dict]:
    """Batch dicts (see `collate`) plus "skipped": [(shard, key, reason)] of the num_skipped bad slots."""
    for samples, bad in batches:
        batch = collate(
            [s["image"] for s in samples],
            [s["text"] for s in samples],
            [s["key"] for s in samples],
            tokenizer,
            max_text_len,
            len(bad),
        )
        yield dict(batch, skipped=bad)


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Placement:
    """What every loader needs besides its data: sizes of a batch and this rank's place among the ranks."""

    image_size: int
    max_text_len: int
    batch_size: int
    rank: int = 0
    world_size: int = 1


class TrainStream(ShardStream):
    """Batches of this rank; DataLoader worker slot k serves the virtual worker (start_batch + k) % W."""

    def __init__(
        self, corpora: list[Corpus], cfg: DataConfig, at: Placement, *, seed: int, start_batch: int, tokenizer
    ):
        super().__init__()
        self.corpora, self.cfg, self.tokenizer = corpora, cfg, tokenizer
        self.image_size, self.max_text_len, self.batch_size = at.image_size, at.max_text_len, at.batch_size
        self.rank, self.world_size, self.seed, self.start_batch = at.rank, at.world_size, seed, start_batch

    def stages(self, stream: int) -> list:
        transform = dict(
            image_size=self.image_size,
            scale=self.cfg.crop_scale,
            ratio=self.cfg.crop_ratio,
            hflip=self.cfg.hflip,
            hflip_text=self.cfg.hflip_text,
        )
        return [
            wds.map(functools.partial(augment, seed=self.seed, stream=stream, **transform)),
            functools.partial(fill_batches, batch_size=self.batch_size),
            functools.partial(collate_stage, tokenizer=self.tokenizer, max_text_len=self.max_text_len),
        ]


class TrainLoader:
    """Iterable of training batches, with the stream's layout (to save in checkpoints) and epoch size.

    The skipped samples each batch carries are logged here, in the consuming process (`skips`: SkipLog).
    """

    def __init__(self, dataset: TrainStream, num_workers: int, layout: dict):
        self.dataset, self.layout = dataset, layout
        self.skips = SkipLog()
        self.num_samples = sum(sum(c.counts) for c in dataset.corpora)
        self.batches_per_epoch = max(1, self.num_samples // (dataset.batch_size * dataset.world_size))
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )

    def __iter__(self) -> Iterator[dict]:
        # The DataLoader's iterator is made here, not on the first next(): making it draws from torch's
        # RNG, and a resumed run restores that RNG right after iter() (the exact-resume contract).
        return self._logged(iter(self.loader))

    def _logged(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.skips.report(batch.get("skipped", ()))
            yield batch


def stream_layout(
    corpora: list[Corpus], cfg: DataConfig, *, batch_size: int, world_size: int, seed: int
) -> dict:
    """Everything the order of samples depends on besides the position; save it with a checkpoint."""
    return {
        "seed": seed,
        "world_size": world_size,
        "num_workers": max(cfg.num_workers, 1),
        "batch_size": batch_size,
        "corpora": [[c.name, c.weight, len(c.urls), sum(c.counts)] for c in corpora],
        "mixing": "by_size",  # corpora drawn in proportion to pairs x weight
        "shuffle_buffer": cfg.shuffle_buffer,
    }


def continue_or_reseed(
    corpora: list[Corpus],
    cfg: DataConfig,
    batch_size: int,
    world_size: int,
    seed: int,
    start_batch: int,
    saved_layout: dict | None,
) -> tuple[dict, int, int]:
    """(layout, seed, start_batch) of the stream to build: the saved position when the layout is the one
    checkpointed, else (a warning) a fresh stream seeded from (seed, start_batch) at 0, so that no earlier
    sample order is replayed."""
    layout = stream_layout(corpora, cfg, batch_size=batch_size, world_size=world_size, seed=seed)
    if saved_layout is not None and saved_layout != layout and start_batch > 0:
        changed = sorted(k for k in layout if saved_layout.get(k) != layout[k])
        log.warning(
            "data stream layout changed since the checkpoint (%s); the resumed stream is freshly "
            "seeded and does not continue the old order",
            ", ".join(changed),
        )
        seed = int.from_bytes(hashlib.sha256(f"{seed}/{start_batch}".encode()).digest()[:4], "little")
        start_batch = 0
    return layout, seed, start_batch


def build_train_loader(
    cfg: DataConfig,
    *,
    image_size: int,
    max_text_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    tokenizer=None,
    saved_layout: dict | None = None,
) -> TrainLoader:
    """Infinite training batches for `rank`, continuing after `start_batch` batches already consumed.

    The same (cfg, seed, world_size, num_workers, batch_size, shards) and start_batch always give the
    same batches. If `saved_layout` (the `layout` of the loader that was checkpointed) differs from
    the current one, the old order cannot be continued: a warning is logged and a fresh stream seeded
    from (seed, start_batch) starts, so no earlier sample order is replayed.
    """
    corpora = resolve_train_corpora(cfg, image_size)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    layout, seed, start_batch = continue_or_reseed(
        corpora, cfg, batch_size, world_size, seed, start_batch, saved_layout
    )
    at = Placement(image_size, max_text_len, batch_size, rank, world_size)
    dataset = TrainStream(corpora, cfg, at, seed=seed, start_batch=start_batch, tokenizer=tokenizer)
    return TrainLoader(dataset, cfg.num_workers, layout)


# ---------------------------------------------------------------------------------------------------
# Validation


class ValStream(IterableDataset):
    """Every sample of the spec exactly once, in file order, dealt to (rank, worker) by sample index."""

    def __init__(self, urls: list[str], at: Placement, tokenizer):
        super().__init__()
        self.urls, self.tokenizer = urls, tokenizer
        self.image_size, self.max_text_len, self.batch_size = at.image_size, at.max_text_len, at.batch_size
        self.rank, self.world_size = at.rank, at.world_size

    def samples(self, stream: int, num_streams: int) -> Iterator[tuple[dict | None, int]]:
        """(decoded sample or None for a bad one) of this stream; raw samples are read, not decoded, by all."""
        raw = (
            s
            for url in self.urls
            for s in wds.tariterators.tarfile_samples([{"url": url}], handler=wds.warn_and_continue)
        )
        for sample in itertools.islice(raw, stream, None, num_streams):
            try:
                image, text = eval_transform(sample, image_size=self.image_size)
                yield {"image": image, "text": text, "key": sample["__key__"]}
            except BadSample as e:
                log.debug("bad validation sample %s: %s", sample.get("__key__"), e.args[0])
                yield None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = self.samples(self.rank * workers + worker, self.world_size * workers)
        while block := list(itertools.islice(samples, self.batch_size)):
            good = [s for s in block if s is not None]
            if good:
                yield collate(
                    [s["image"] for s in good],
                    [s["text"] for s in good],
                    [s["key"] for s in good],
                    self.tokenizer,
                    self.max_text_len,
                    len(block) - len(good),
                )


def build_val_loader(
    spec: str,
    *,
    image_size: int,
    max_text_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer=None,
    num_workers: int = 0,
) -> Iterable[dict]:
    """Deterministic validation batches (resize + centre crop, no flip); the last batch may be smaller."""
    urls = existing_shards(corpus_shards(spec, subset=True)[0], "validation")  # a directory or a spec
    at = Placement(image_size, max_text_len, batch_size, rank, world_size)
    dataset = ValStream(urls, at, tokenizer or load_tokenizer())
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
