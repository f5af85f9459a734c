"""Skipped training samples are named in the log (console and train.log), rate-limited, from any worker."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
from conftest import image_bytes

from eve_ds.data import CorpusConfig, DataConfig, build_train_loader, load_tokenizer
from eve_ds.data.skipped import SkipLog, Skipped
from eve_ds.data.writer import ShardStats, make_manifest, write_tar
from eve_ds.train.metrics import setup_logging

CORRUPT = ("broken-a", "broken-b", "broken-c")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def shard(tmp_path):
    """One tar shard of 40 samples, three of them corrupt JPEGs (7.5%), with its manifest."""
    jpeg = image_bytes((0, 120, 0), fmt="JPEG", size=(24, 20))
    samples = [{"__key__": f"good-{i:02d}", "jpg": jpeg, "txt": f"photo {i}".encode()} for i in range(37)]
    good = samples[0]["jpg"]
    bad = [good[: len(good) // 3], b"\xff\xd8\xff not a jpeg at all", b""]
    samples += [{"__key__": k, "jpg": b or b"\x00", "txt": b"a caption"} for k, b in zip(CORRUPT, bad)]
    path = tmp_path / "shard-000000.tar"
    write_tar(str(path), samples)
    manifest = make_manifest([ShardStats(path.name, len(samples))], {}, {})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


def one_epoch(shard: str, tok, num_workers: int) -> tuple[list[dict], object]:
    cfg = DataConfig(train=[CorpusConfig("web", shard)], num_workers=num_workers, shuffle_buffer=8)
    train = build_train_loader(
        cfg, image_size=32, max_text_len=16, batch_size=5, rank=0, world_size=1, seed=0, tokenizer=tok
    )
    # Every worker stream reads whole visits of the one shard: one visit (8 batches of 5) per worker.
    return list(itertools.islice(iter(train), 8 * max(num_workers, 1))), train


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_members_are_named_in_a_warning(shard, tok, caplog, num_workers):
    with caplog.at_level(logging.WARNING):
        batches, train = one_epoch(shard, tok, num_workers)
    assert sum(b["num_skipped"] for b in batches) == train.skips.total == 3 * max(num_workers, 1)
    named = [r for r in caplog.records if r.name == "eve_ds.data.skipped"]
    assert len(named) == train.skips.total
    for record in named:  # logged in this process, whatever process decoded the sample
        message = record.getMessage()
        assert shard in message and "corpus web" in message and "unreadable_image" in message
        assert any(k in message for k in CORRUPT)
    assert {s[2] for b in batches for s in b["skipped"]} <= set(CORRUPT)


def test_skip_warnings_reach_train_log(shard, tok, tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(0, tmp_path / "run")
        one_epoch(shard, tok, num_workers=2)
    finally:
        for h in root.handlers[:]:
            h.close()
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    text = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING eve_ds.data.skipped: skipped sample broken-" in text and shard in text


def test_skip_log_names_the_first_then_summarises(caplog):
    skips = SkipLog(first=3, every=10)
    with caplog.at_level(logging.WARNING):
        skips.report([Skipped("c", "s.tar", f"k{i}", "empty_text") for i in range(25)])
        skips.report([Skipped("c", "short.tar", None, "short_shard")] * 5)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" of ")[0] for line in lines[:3]] == [f"skipped sample k{i}" for i in range(3)]
    assert "summarised every 10" in lines[2]
    assert lines[3] == "10 samples skipped so far (empty_text=10); the latest: k9 of shard s.tar: empty_text"
    assert lines[4].startswith("20 samples skipped so far")
    assert sum(line.startswith("shard short.tar") for line in lines) == 1  # a short shard is named once
    assert lines[-1] == (
        "30 samples skipped so far (empty_text=25, short_shard=5); the latest: (missing) of shard "
        "short.tar: short_shard"
    )
    assert len(lines) == 7 and skips.total == 30 and skips.by_reason["short_shard"] == 5
