"""Skipped training samples, named: which shard, which key, why -- rate-limited in the log.

A bad sample (unreadable image, missing image or caption, empty caption) never stops training: its slot
is refilled from the same batch. So that bad data still shows, every batch carries the (corpus, shard,
key, reason) of the slots it skipped, and the consuming process logs them with a `SkipLog`. They travel
with the batch instead of being logged where they are found because that is a DataLoader worker
process, whose log handlers are the parent's only when it was forked.

Rate limit, per process (per rank): the first FIRST skipped samples are each named on a warning line,
then one summary line every EVERY skipped samples (the counts by reason and the latest one). A shard
shorter than its manifest (or unreadable) is named once, however many of its slots are padded.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)

FIRST = 20
EVERY = 1000
SHORT_SHARD = "short_shard"


class Skipped(NamedTuple):
    corpus: str | None
    shard: str | None
    key: str | None  # None for the padded slots of a short shard
    reason: str


def skipped_of(samples: Iterable[dict]) -> list[Skipped]:
    """The Skipped of each bad-sample marker ({"__bad__": reason, ...}) among `samples`."""
    return [
        Skipped(s.get("__corpus__"), s.get("__url__"), s.get("__key__"), s["__bad__"])
        for s in samples
        if "__bad__" in s
    ]


class SkipLog:
    """Counts skipped samples by reason and logs them, rate-limited (see the module docstring)."""

    def __init__(self, first: int = FIRST, every: int = EVERY, logger: logging.Logger = log):
        self.first, self.every, self.log = first, every, logger
        self.total, self.named = 0, 0
        self.by_reason: collections.Counter = collections.Counter()
        self.short_shards: set[str | None] = set()

    def report(self, skipped: Iterable[tuple]) -> None:
        for s in skipped:
            self._one(Skipped(*s))

    def _one(self, s: Skipped) -> None:
        self.total += 1
        self.by_reason[s.reason] += 1
        if s.reason == SHORT_SHARD:
            if s.shard not in self.short_shards:
                self.short_shards.add(s.shard)
                self.log.warning(
                    "shard %s (corpus %s) holds fewer samples than its manifest lists or cannot be read; "
                    "its missing samples are skipped",
                    s.shard,
                    s.corpus,
                )
        elif self.named < self.first:
            self.named += 1
            last = self.named == self.first
            self.log.warning(
                "skipped sample %s of shard %s (corpus %s): %s%s",
                s.key,
                s.shard,
                s.corpus,
                s.reason,
                f"; further skips are summarised every {self.every}" if last else "",
            )
            return
        if self.total % self.every == 0:
            self.log.warning(
                "%d samples skipped so far (%s); the latest: %s of shard %s: %s",
                self.total,
                ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items())),
                s.key or "(missing)",
                s.shard,
                s.reason,
            )
