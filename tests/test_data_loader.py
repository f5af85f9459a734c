"""Training and validation loaders: batch format, mixing, splitting, exact resume, bad samples and shards."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image

from eve_ds.data import CorpusConfig, DataConfig, build_train_loader, build_val_loader, load_tokenizer
from eve_ds.data.pipeline import load_corpus
from eve_ds.data.synthetic import make_synthetic_corpus
from eve_ds.data.transforms import normalize_image, train_transform
from eve_ds.data.writer import ShardStats, make_manifest, write_tar
from eve_ds.train.config import from_dict

IMAGE = 32


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two synthetic corpora: "a" with 8 shards of 10, "b" with 3 shards of 10; val of 20 in 2 shards."""
    root = tmp_path_factory.mktemp("corpora")
    make_synthetic_corpus(str(root / "a"), 80, 20, seed=1, image_size=IMAGE, samples_per_shard=10)
    make_synthetic_corpus(str(root / "b"), 30, 1, seed=2, image_size=IMAGE, samples_per_shard=10)
    return {
        "a": str(root / "a/train/shard-{000000..000007}.tar"),
        "b": str(root / "b/train/shard-{000000..000002}.tar"),
        "val": str(root / "a/val/shard-{000000..000001}.tar"),
    }


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def loader(
    cfg: DataConfig,
    tok,
    *,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 4,
    seed: int = 0,
    **kw,
):
    return build_train_loader(
        cfg,
        image_size=IMAGE,
        max_text_len=24,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_batch=start_batch,
        tokenizer=tok,
        **kw,
    )


def test_batch_format(corpora, tok):
    cfg = DataConfig(train=[CorpusConfig("a", corpora["a"])], num_workers=0)
    train = loader(cfg, tok)
    assert train.num_samples == 80 and train.batches_per_epoch == 20
    (batch,) = take(train, 1)
    # uint8 from the loader (4x less to move from workers and to the GPU), normalised by the consumer
    assert batch["image"].shape == (4, 3, IMAGE, IMAGE) and batch["image"].dtype == torch.uint8
    assert batch["text_ids"].dtype == batch["text_mask"].dtype == torch.int64
    image = normalize_image(batch["image"])
    assert image.dtype == torch.float32 and -2.2 < image.min() < 0 < image.max() < 2.7  # ImageNet-normalised
    assert normalize_image(image, torch.bfloat16).dtype == torch.bfloat16  # float input: only cast
    ids, mask = batch["text_ids"], batch["text_mask"]
    lengths = mask.sum(1)
    # Padded to the batch's longest text (at most max_text_len = 24), not to max_text_len.
    assert ids.shape == mask.shape == (4, int(lengths.max())) and lengths.max() <= 24
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert all(ids[i, lengths[i] - 1] == tok.sep_token_id for i in range(4))
    assert ((ids == 0) == (mask == 0)).all()  # padding id 0 exactly where the mask is 0
    assert len(set(batch["key"])) == 4 and all(k.startswith("a/synthetic_train-") for k in batch["key"])
    assert batch["num_skipped"] == 0


def test_mixing_weights(corpora, tok):
    cfg = DataConfig(
        train=[CorpusConfig("a", corpora["a"], 3.0), CorpusConfig("b", corpora["b"], 1.0)], num_workers=0
    )
    keys = [k for b in take(loader(cfg, tok, batch_size=50), 8) for k in b["key"]]
    share = sum(k.startswith("a/") for k in keys) / len(keys)
    # Corpora are drawn in proportion to pairs x weight: a has 80 pairs, b 30.
    expected = 80 * 3.0 / (80 * 3.0 + 30 * 1.0)
    assert abs(share - expected) < 3.5 * (expected * (1 - expected) / len(keys)) ** 0.5  # 3.5 sd, 400 draws


def test_ranks_and_workers_see_disjoint_samples(corpora, tok):
    cfg = DataConfig(train=[CorpusConfig("a", corpora["a"])], num_workers=2, shuffle_buffer=10)
    seen = []
    for rank in range(2):
        # 4 streams x 2 shard visits of 10 = exactly one epoch of the 80 samples.
        for batch in take(loader(cfg, tok, rank=rank, world_size=2, batch_size=5), 8):
            seen += batch["key"]
    assert len(seen) == 80 and len(set(seen)) == 80


@pytest.mark.parametrize("start", [3, 11])  # odd, before and after whole shard visits can be skipped
def test_resume_is_exact(corpora, tok, start):
    cfg = DataConfig(
        train=[CorpusConfig("a", corpora["a"], 1.0), CorpusConfig("b", corpora["b"], 2.0)],
        num_workers=2,
        shuffle_buffer=4,
    )
    full = take(loader(cfg, tok), 16)  # 64 samples: past an epoch of corpus b
    resumed_loader = loader(cfg, tok, start_batch=start, saved_layout=loader(cfg, tok).layout)
    resumed = take(resumed_loader, 16 - start)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
    for a, b in zip(resumed, full[start:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])
    # Different seeds give different streams (the test above could not pass by accident).
    assert [b["key"] for b in take(loader(cfg, tok, seed=1), 2)] != [b["key"] for b in full[:2]]


def test_changed_layout_warns_and_reseeds(corpora, tok, caplog):
    cfg = DataConfig(train=[CorpusConfig("a", corpora["a"])], num_workers=0)
    old = loader(cfg, tok).layout
    cfg.num_workers = 2
    with caplog.at_level(logging.WARNING):
        fresh = loader(cfg, tok, start_batch=3, saved_layout=old)
    assert "num_workers" in caplog.text
    assert fresh.dataset.start_batch == 0 and fresh.dataset.seed != 0


def test_missing_shard_is_reported_and_skipped(corpora, tok, tmp_path, caplog):
    spec = corpora["a"]
    kept = os.path.dirname(spec)
    # A copy of the corpus whose shard 3 is gone.
    copy = tmp_path / "a"
    copy.mkdir()
    for name in os.listdir(kept):
        if name != "shard-000003.tar" and not name.startswith("_"):
            os.symlink(os.path.join(kept, name), copy / name)
    cfg = DataConfig(
        train=[CorpusConfig("a", str(copy / os.path.basename(spec)))], num_workers=0, shuffle_buffer=10
    )
    with caplog.at_level(logging.WARNING):
        train = loader(cfg, tok, batch_size=7)
    assert "shard-000003.tar" in caplog.text and "missing" in caplog.text
    keys = {k for b in take(train, 10) for k in b["key"]}  # one epoch of the 7 remaining shards
    assert len(keys) == 70 and not any(k.endswith(f"-0000000{30 + i}") for k in keys for i in range(10))


def jpeg_bytes(colour) -> bytes:
    return image_bytes(colour, fmt="JPEG", size=(24, 20))


def test_bad_samples_are_skipped_and_counted(tmp_path, tok):
    good = [
        {"__key__": f"g{i}", "jpg": jpeg_bytes((30 * i, 0, 0)), "txt": f"image {i}".encode()}
        for i in range(7)
    ]
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8 not really a jpeg", "txt": b"text"},
        {"__key__": "notext", "jpg": jpeg_bytes((0, 0, 0))},
        {"__key__": "empty", "jpg": jpeg_bytes((0, 0, 0)), "txt": b"  "},
    ]
    samples = good + bad
    random.Random(0).shuffle(samples)
    write_tar(str(tmp_path / "shard-000000.tar"), samples)
    manifest = make_manifest([ShardStats("shard-000000.tar", 10)], {}, {})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(train=[CorpusConfig("x", str(tmp_path / "shard-000000.tar"))], num_workers=0)
    batches = take(loader(cfg, tok, batch_size=5), 2)  # the 10 slots of the one shard
    assert all(len(b["key"]) == 5 and b["image"].shape[0] == 5 for b in batches)
    assert sum(b["num_skipped"] for b in batches) == 3
    assert {k for b in batches for k in b["key"]} == {f"x/g{i}" for i in range(7)}


def test_img2dataset_shards_without_manifest(tmp_path, tok):
    for shard, stats in ((0, True), (1, False)):
        samples = [
            {
                "__key__": f"{shard:05d}{i:04d}",
                "jpg": jpeg_bytes((0, 200, 0)),
                "txt": b"a green photo",
                "json": json.dumps({"url": "http://x", "key": f"{shard:05d}{i:04d}"}).encode(),
            }
            for i in range(6)
        ]
        write_tar(str(tmp_path / f"{shard:05d}.tar"), samples)
        if stats:
            (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 9, "successes": 6}))
    spec = str(tmp_path / "{00000..00001}.tar")
    assert load_corpus("laion", spec).counts == [6, 6]
    cfg = DataConfig(train=[CorpusConfig("laion", spec)], num_workers=0)
    keys = {k for b in take(loader(cfg, tok, batch_size=6), 2) for k in b["key"]}
    assert len(keys) == 12


def test_val_loader_each_sample_once_same_order(corpora, tok):
    def run(rank):
        return list(
            build_val_loader(
                corpora["val"],
                image_size=IMAGE,
                max_text_len=24,
                batch_size=3,
                rank=rank,
                world_size=2,
                tokenizer=tok,
                num_workers=2,
            )
        )

    r0, r1 = run(0), run(1)
    keys0, keys1 = [k for b in r0 for k in b["key"]], [k for b in r1 for k in b["key"]]
    assert sorted(keys0 + keys1) == [f"synthetic_val-{i:09d}" for i in range(20)]
    assert [k for b in run(0) for k in b["key"]] == keys0


def gradient_image(w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: red rises along x, green along y, blue in 4 px stripes: every crop differs."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 250 // (w - 1), y * 250 // (h - 1), (x // 4 % 2) * 200], -1).astype(np.uint8)


def centre_crop_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centre square of the image resized to size x size (bilinear), by PIL directly."""
    h, w = pixels.shape[:2]
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = Image.fromarray(pixels).crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


def test_val_loader_gives_the_centre_crop_of_a_known_image(tmp_path, tok):
    """Validation: shorter side to S and the centre square, no random crop, no flip."""
    shapes = {"wide": (48, 30), "tall": (26, 50), "square": (40, 40)}
    images = {name: gradient_image(w, h) for name, (w, h) in shapes.items()}
    samples = [{"__key__": k, "png": image_bytes(v), "txt": f"{k} image".encode()} for k, v in images.items()]
    write_tar(str(tmp_path / "shard-000000.tar"), samples)
    (batch,) = build_val_loader(
        str(tmp_path / "shard-000000.tar"), image_size=16, max_text_len=8, batch_size=3, tokenizer=tok
    )
    assert batch["key"] == list(shapes)
    for got, name in zip(batch["image"], batch["key"]):
        got = got.permute(1, 2, 0).numpy().astype(int)
        expected = centre_crop_resize(images[name], 16).astype(int)
        assert np.abs(got - expected).max() <= 1, name
        # The test tells a centre crop from the other plausible transforms.
        squashed = np.asarray(Image.fromarray(images[name]).resize((16, 16), Image.BILINEAR)).astype(int)
        assert name == "square" or np.abs(got - squashed).max() > 20
        assert np.abs(got - expected[:, ::-1]).max() > 100  # not flipped
    # The consumer's normalisation of these pixels: (x / 255 - mean) / std, by hand for one pixel.
    x = batch["image"][0, :, 3, 5].double() / 255
    want = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)) / torch.tensor(
        [0.229, 0.224, 0.225], dtype=torch.float64
    )
    torch.testing.assert_close(normalize_image(batch["image"])[0, :, 3, 5].double(), want, atol=1e-6, rtol=0)


def test_hflip_swaps_left_and_right():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (255, 0, 0)  # red on the left
    sample = {"png": image_bytes(img), "txt": b"red on the left, black on the Right"}
    kw = dict(image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    flipped, text = train_transform(sample, random.Random(0), hflip_text="swap", **kw)
    assert text == "red on the right, black on the left"
    assert flipped[:, 24, 0].min() > 250 and flipped[:, 8, 0].max() < 5  # red is now on the right
    _, text = train_transform(sample, random.Random(0), hflip_text="ignore", **kw)
    assert text == "red on the left, black on the Right"
    _, text = train_transform({**sample, "txt": b"a red square"}, random.Random(0), hflip_text="skip", **kw)
    assert text == "a red square"


@pytest.mark.parametrize("hflip_text", ["skip", "swap"])
def test_hflip_text_in_the_train_loader(tmp_path, tok, hflip_text):
    """hflip=0.5 over one epoch of 40 samples, half with a caption that says left or right. "skip": those
    are never flipped (pixels equal to the image), the others sometimes; "swap": both kinds are flipped
    sometimes, and a flipped spatial caption says "right" where the original says "left"."""
    img = gradient_image(32, 32)
    samples = [
        {
            "__key__": f"{kind}{i:02d}",
            "png": image_bytes(img),
            "txt": b"a red square to the left of a blue circle" if kind == "lr" else b"a red square",
        }
        for i in range(20)
        for kind in ("lr", "plain")
    ]
    write_tar(str(tmp_path / "shard-000000.tar"), samples)
    (tmp_path / "manifest.json").write_text(
        json.dumps(make_manifest([ShardStats("shard-000000.tar", 40)], {}, {}))
    )
    cfg = DataConfig(
        train=[CorpusConfig("x", str(tmp_path / "shard-000000.tar"))],
        num_workers=0,
        crop_scale=(1.0, 1.0),  # the whole image: only the flip changes pixels
        crop_ratio=(1.0, 1.0),
        hflip=0.5,
        hflip_text=hflip_text,
    )
    flips = {"lr": [], "plain": []}
    unflipped, mirrored = (
        torch.from_numpy(img).permute(2, 0, 1),
        torch.from_numpy(img[:, ::-1].copy()).permute(2, 0, 1),
    )
    for batch in take(loader(cfg, tok, batch_size=8), 5):
        for key, image, ids in zip(batch["key"], batch["image"], batch["text_ids"]):
            assert torch.equal(image, unflipped) or torch.equal(image, mirrored), key
            kind = "lr" if key.startswith("x/lr") else "plain"
            flipped = torch.equal(image, mirrored)
            flips[kind].append(flipped)
            if kind == "lr":
                text = tok.decode(ids, skip_special_tokens=True)
                assert text == f"a red square to the {'right' if flipped else 'left'} of a blue circle"
    assert len(flips["lr"]) == len(flips["plain"]) == 20
    assert 0 < sum(flips["plain"]) < 20
    if hflip_text == "skip":
        assert not any(flips["lr"])
    else:
        assert 0 < sum(flips["lr"]) < 20


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"data.hflip_text=.mirror. is invalid: expected one of"):
        DataConfig(synthetic=True, hflip_text="mirror")
    with pytest.raises(ValueError, match="crop_scale"):
        DataConfig(synthetic=True, crop_scale=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"data.train=.*at least one corpus"):
        from_dict({"model": {"flavor": "eve_tiny"}, "data": {"synthetic": False}})
    cfg = DataConfig(train=[{"name": "coco", "shards": "x-{0..3}.tar", "weight": 2}], crop_scale=[0.4, 1.0])
    assert cfg.train[0] == CorpusConfig("coco", "x-{0..3}.tar", 2.0) and cfg.crop_scale == (0.4, 1.0)
