"""The exactly resumable raw-sample stream behind the training loader.

Every (rank, worker) pair reads its own stream g of G = world_size * max(num_workers, 1). A stream is
a deterministic function of (seed, g, G) and of its position (the number of raw samples it has
produced, called slots):

* Slot j takes its sample from corpus c(j), drawn from the weights by a counter-based RNG seeded with
  (seed, g, j // BLOCK): the corpus counts up to any slot are computed without reading data.
* Per corpus, the visits to shards form one global sequence: epoch e is a seeded permutation of the
  shards, and visit t of that sequence belongs to stream t % G (shards split by node and worker,
  disjoint within an epoch). A visit yields exactly the manifest's number of samples, in an order
  shuffled by a buffer seeded with the visit number only (a bad or short shard is padded with
  bad-sample markers, so the count holds).

Fast-forwarding to a slot therefore skips whole visits by their manifest counts and reads raw (never
decoded) samples only inside the one visit where it lands.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)

BLOCK = 4096  # slots per corpus-choice RNG block
_PERM, _CHOICE, _VISIT = 1, 2, 3  # RNG stream tags


@dataclass
class Corpus:
    name: str
    urls: list[str]
    counts: list[int]  # samples per shard, from the manifest
    weight: float = 1.0

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def sampling_mass(self) -> float:
        """Corpora are mixed as a union: drawn in proportion to their pairs, times `weight`."""
        return self.num_samples * self.weight


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %r", exn)
    return True


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples ({"__key__", ext: bytes}) of one tar shard; a missing or broken shard is logged."""
    yield from tarfile_samples([{"url": url}], handler=_warn_and_continue)


def shard_visit(url: str, count: int, rng: random.Random, buffer: int) -> Iterator[dict]:
    """Exactly `count` samples of a shard in a seeded shuffled order, padded with bad markers if short."""
    samples = itertools.islice(read_shard(url), count)
    short = {"__bad__": "short_shard", "__key__": None, "__url__": url}
    padded = itertools.chain(samples, itertools.repeat(short))
    return shuffle(bufsize=buffer, initial=buffer, rng=rng)(itertools.islice(padded, count))


class CorpusReader:
    """The samples one stream reads from one corpus: visits g, g + G, g + 2G, ... of the corpus."""

    def __init__(
        self, corpus: Corpus, corpus_index: int, seed: int, stream: int, num_streams: int, buffer: int
    ):
        self.corpus, self.index, self.seed = corpus, corpus_index, seed
        self.stream, self.num_streams, self.buffer = stream, num_streams, buffer
        self._perm_epoch, self._perm = -1, None

    def shard_of_visit(self, t: int) -> int:
        n = len(self.corpus.urls)
        epoch = t // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, self.index, epoch, _PERM]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[t % n])

    def samples(self, start: int = 0) -> Iterator[dict]:
        """This stream's samples of the corpus from its `start`-th on (whole visits skipped by count)."""
        k = 0
        while True:
            t = self.stream + k * self.num_streams
            shard = self.shard_of_visit(t)
            count = self.corpus.counts[shard]
            if start < count:
                rng = random.Random(f"{self.seed}/{self.index}/{t}/{_VISIT}")
                visit = shard_visit(self.corpus.urls[shard], count, rng, self.buffer)
                yield from itertools.islice(visit, start, None)
            start = max(0, start - count)
            k += 1


def corpus_choices(weights: list[float], seed: int, stream: int, block: int) -> np.ndarray:
    """Corpus index of each slot in block `block` of a stream: (BLOCK,) int."""
    if len(weights) == 1:
        return np.zeros(BLOCK, dtype=np.int64)
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    return np.random.default_rng([seed, stream, block, _CHOICE]).choice(len(weights), size=BLOCK, p=p)


def corpus_counts(weights: list[float], seed: int, stream: int, slots: int) -> list[int]:
    """How many of the first `slots` slots of a stream chose each corpus (no data is read)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    for b in range(slots // BLOCK + 1):
        used = min(BLOCK, slots - b * BLOCK)
        if used > 0:
            counts += np.bincount(corpus_choices(weights, seed, stream, b)[:used], minlength=len(weights))
    return counts.tolist()


def raw_stream(
    corpora: list[Corpus], *, seed: int, stream: int, num_streams: int, start_slot: int, buffer: int
) -> Iterator[dict]:
    """Infinite raw samples of stream `stream` from slot `start_slot` on; each gets __corpus__ and __slot__."""
    weights = [c.sampling_mass for c in corpora]
    skip = corpus_counts(weights, seed, stream, start_slot)
    readers = [
        CorpusReader(c, i, seed, stream, num_streams, buffer).samples(skip[i]) for i, c in enumerate(corpora)
    ]
    for slot in itertools.count(start_slot):
        if slot % BLOCK == 0 or slot == start_slot:
            choices = corpus_choices(weights, seed, stream, slot // BLOCK)
        c = int(choices[slot % BLOCK])
        sample = dict(next(readers[c]), __corpus__=corpora[c].name, __slot__=slot)
        yield sample


class ShardStream(IterableDataset):
    """A rank's training batches: `raw_stream` over `corpora`, then the stages a subclass adds (`stages`).

    Each loader worker reads its own stream (rank * workers + worker of world_size * workers); batch b of
    the rank comes from worker b % workers, at its local batch b // workers, so a restart at `start_batch`
    reproduces the uninterrupted order. Subclasses set corpora, cfg (num_workers, shuffle_buffer), seed,
    start_batch, batch_size, rank and world_size.
    """

    def stages(self, stream: int) -> list:
        """The pipeline stages after the raw samples of `stream`."""
        raise NotImplementedError

    def pipeline(self, virtual_worker: int, local_batch: int) -> wds.DataPipeline:
        workers = max(self.cfg.num_workers, 1)
        stream = self.rank * workers + virtual_worker
        source = functools.partial(
            raw_stream,
            self.corpora,
            seed=self.seed,
            stream=stream,
            num_streams=self.world_size * workers,
            start_slot=local_batch * self.batch_size,
            buffer=self.cfg.shuffle_buffer,
        )
        return wds.DataPipeline(source, *self.stages(stream))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(self.cfg.num_workers, 1)
        position = self.start_batch + (info.id if info is not None else 0)
        return iter(self.pipeline(position % workers, position // workers))
