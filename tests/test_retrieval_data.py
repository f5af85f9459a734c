"""Image-text retrieval: the Karpathy-split reader on fixtures in the official layouts, the datasets and
collate, recall@K with ties and multi-caption images, ALBEF-style re-ranking (also split over ranks), and
the synthetic sets read back by the real reader."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data import load_tokenizer
from eve_ds.data.synthetic import COLOURS, SHAPES
from eve_ds.tasks.retrieval.data import (
    RetrievalDataError,
    RetrievalImage,
    RetrievalImageDataset,
    RetrievalTrainDataset,
    image_to_texts,
    read_karpathy,
    retrieval_image_collate,
    retrieval_train_collate,
    texts_of,
)
from eve_ds.tasks.retrieval.eval import LOW_SCORE, combine_partial, recall_at_k, rerank, row_block
from eve_ds.tasks.retrieval.synthetic import (
    _multi_shape_paraphrases,
    ensure_synthetic_retrieval,
    make_synthetic_retrieval,
    synthetic_example,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_image(path: str) -> None:
    """A 32x32 JPEG, red left half and blue right half (so a flip is visible)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = RED
    pixels[:, 16:] = BLUE
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)


def coco_entry(cocoid: int, split: str, captions: list[str]) -> dict:
    folder = "train2014" if split == "train" else "val2014"
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "cocoid": cocoid,
        "imgid": cocoid,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
    }


def write_karpathy(root, dataset: str, entries: list[dict], missing: tuple[int, ...] = ()) -> None:
    """The JSON and an image for each entry except the positions in `missing`."""
    for i, e in enumerate(entries):
        folder = e.get("filepath", "flickr30k-images")
        if i not in missing:
            write_image(os.path.join(root, folder, e["filename"]))
    name = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}[dataset]
    with open(os.path.join(root, name), "w") as f:
        json.dump({"images": entries, "dataset": dataset}, f)


SIX = [f"caption number {i}" for i in range(6)]


@pytest.fixture
def coco(tmp_path):
    entries = [
        coco_entry(1, "train", ["a red  square\n", "a blue square left of a red one"]),
        coco_entry(2, "restval", SIX),
        coco_entry(3, "train", ["its image file is missing"]),
        coco_entry(4, "train", []),
        coco_entry(5, "val", ["a val image"]),
        coco_entry(6, "test", ["test one", "test one again"]),
        coco_entry(7, "test", ["test two", "  "]),
    ]
    write_karpathy(tmp_path, "coco", entries, missing=(2,))
    return tmp_path


def test_coco_train_is_train_plus_restval(coco):
    images, counts = read_karpathy(str(coco), "coco", "train")
    assert [im.image_id for im in images] == [1, 2]
    assert images[0] == RetrievalImage(
        1,
        os.path.join(str(coco), "train2014", "COCO_train2014_000000000001.jpg"),
        ("a red square", "a blue square left of a red one"),
    )
    assert images[1].captions == tuple(SIX)
    assert images[1].image_path.endswith(os.path.join("val2014", "COCO_val2014_000000000002.jpg"))
    assert counts == {
        "images": 2,
        "captions": 8,
        "restval": 1,
        "missing_image": 1,
        "no_captions": 1,
        "empty_captions": 0,
    }


def test_coco_test_split(coco):
    images, counts = read_karpathy(str(coco), "coco", "test")
    assert [(im.image_id, im.captions) for im in images] == [
        (6, ("test one", "test one again")),
        (7, ("test two",)),
    ]
    assert counts["empty_captions"] == 1 and counts["captions"] == 3
    val, _ = read_karpathy(str(coco), "coco", "val")
    assert [im.image_id for im in val] == [5]


def test_missing_test_image_is_an_error_unless_skipped(coco):
    os.remove(coco / "val2014" / "COCO_val2014_000000000007.jpg")
    with pytest.raises(RetrievalDataError, match=re.escape("COCO_val2014_000000000007.jpg")):
        read_karpathy(str(coco), "coco", "test")
    images, counts = read_karpathy(str(coco), "coco", "test", skip_bad_test_images=True)
    assert [im.image_id for im in images] == [6] and counts["missing_image"] == 1


def test_malformed_files_name_file_and_field(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [')
    with pytest.raises(RetrievalDataError, match=re.escape("dataset_coco.json: not valid JSON")):
        read_karpathy(str(tmp_path), "coco", "train")
    entry = coco_entry(1, "test", ["x"])
    del entry["cocoid"]
    write_karpathy(tmp_path, "coco", [coco_entry(9, "test", ["y"]), entry])
    with pytest.raises(RetrievalDataError, match=r'dataset_coco.json: images\[1\]: missing field "cocoid"'):
        read_karpathy(str(tmp_path), "coco", "test")
    entry = coco_entry(1, "test", ["x", "y"])
    del entry["sentences"][1]["raw"]
    write_karpathy(tmp_path, "coco", [entry])
    with pytest.raises(RetrievalDataError, match=r'images\[0\].sentences\[1\]: missing field "raw"'):
        read_karpathy(str(tmp_path), "coco", "test")
    write_karpathy(tmp_path, "coco", [coco_entry(1, "test", ["x"]), coco_entry(1, "test", ["y"])])
    with pytest.raises(RetrievalDataError, match=r"images\[1\]: cocoid 1 repeats .*images\[0\]"):
        read_karpathy(str(tmp_path), "coco", "test")
    write_karpathy(tmp_path, "coco", [{**coco_entry(1, "test", ["x"]), "split": "dev"}])
    with pytest.raises(RetrievalDataError, match="'dev'"):
        read_karpathy(str(tmp_path), "coco", "test")
    with pytest.raises(
        RetrievalDataError, match=re.escape("dataset_flickr30k.json: annotation file not found")
    ):
        read_karpathy(str(tmp_path), "flickr30k", "test")
    with pytest.raises(RetrievalDataError, match="'flickr8k'"):
        read_karpathy(str(tmp_path), "flickr8k", "test")


def test_flickr_layout(tmp_path):
    entries = [
        {"filename": f"{1000 + i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": f"c{i}"}] * (i + 1)}
        for i, split in enumerate(["train", "test", "val", "test"])
    ]
    write_karpathy(tmp_path, "flickr30k", entries)
    images, counts = read_karpathy(str(tmp_path), "flickr30k", "test")
    assert [im.image_id for im in images] == [1, 3]
    assert images[1].image_path == os.path.join(str(tmp_path), "flickr30k-images", "1003.jpg")
    assert images[1].captions == ("c3",) * 4 and counts["captions"] == 6


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bert-base-uncased")


def test_train_dataset_flip_rule_and_collate(coco, tokenizer):
    images, _ = read_karpathy(str(coco), "coco", "train")
    flipping = RetrievalTrainDataset(images, image_size=16, train=True, hflip=1.0)
    assert len(flipping) == 8
    plain, spatial = flipping[0], flipping[1]  # "a red square" / "a blue square left of a red one"
    assert plain["image"].shape == (16, 16, 3) and plain["image"].dtype == np.uint8
    assert plain["image"][8, 2, 2] > 200 and plain["image"][8, 2, 0] < 60  # flipped: blue on the left
    assert (
        spatial["image"][8, 2, 0] > 200 and spatial["image"][8, 2, 2] < 60
    )  # never flipped: red on the left
    unflipped = RetrievalTrainDataset(images, image_size=16, train=False, hflip=1.0)[0]["image"]
    np.testing.assert_array_equal(plain["image"], unflipped[:, ::-1])
    assert [flipping[i]["text"] for i in (2, 7)] == [SIX[0], SIX[5]]
    assert flipping[2]["image_id"] == 2

    with open(images[1].image_path, "wb") as f:
        f.write(b"not a jpeg")
    items = [flipping[i] for i in (0, 2, 1, 3)]
    assert items[1] is None and items[3] is None
    batch = retrieval_train_collate(items, tokenizer, max_text_len=12)
    assert batch["image_id"].dtype == torch.int64 and batch["image_id"].tolist() == [1, 1]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.uint8
    longest = int(batch["text_mask"].sum(1).max())  # padded to the longest caption, at most max_text_len
    assert (
        batch["text_ids"].shape == (2, longest) and longest <= 12 and batch["text_mask"].dtype == torch.int64
    )
    assert batch["num_skipped"] == 2
    assert (
        tokenizer.decode(batch["text_ids"][1], skip_special_tokens=True) == "a blue square left of a red one"
    )
    assert retrieval_train_collate([None, None], tokenizer, 12) is None


def test_eval_dataset_and_text_index(coco):
    images, _ = read_karpathy(str(coco), "coco", "test")
    assert texts_of(images) == (["test one", "test one again", "test two"], [0, 0, 1])
    assert image_to_texts(images) == [[0, 1], [2]]
    ds = RetrievalImageDataset(images, image_size=8)
    batch = retrieval_image_collate([ds[1], ds[0]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["index"].tolist() == [1, 0]
    with open(images[0].image_path, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    with pytest.raises(RetrievalDataError, match=re.escape("COCO_val2014_000000000006.jpg")):
        ds[0]


# ---- the metric ----

# 3 images, 5 texts: image 0 has texts 0 and 1, image 1 text 2, image 2 texts 3 and 4.
TEXT_TO_IMAGE = [0, 0, 1, 2, 2]
SCORES = torch.tensor(
    [
        [0.2, 0.9, 0.9, 0.1, 0.5],
        [0.8, 0.7, 0.3, 0.3, 0.6],
        [0.5, 0.5, 0.5, 0.4, 0.5],
    ],
    dtype=torch.float64,
)


def test_recall_by_hand_with_ties():
    # TR, rank of an image's best caption = number of texts scored strictly higher:
    #   image 0: best caption 1 (0.9), tied with text 2, none higher -> 0
    #   image 1: caption 2 (0.3); 0.8, 0.7, 0.6 higher (text 3's tie does not count) -> 3
    #   image 2: best caption 4 (0.5), tied with texts 0, 1, 2 -> 0
    # IR, column t, rank of its image = number of images scored strictly higher:
    #   text 0 [0.2, 0.8, 0.5] -> 2; text 1 [0.9, 0.7, 0.5] -> 0; text 2 [0.9, 0.3, 0.5] -> 2;
    #   text 3 [0.1, 0.3, 0.4] -> 0; text 4 [0.5, 0.6, 0.5] (tied with image 0) -> 1
    r = recall_at_k(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 4))
    expected = {
        "tr_r1": 200 / 3,
        "tr_r2": 200 / 3,
        "tr_r4": 100.0,
        "ir_r1": 40.0,
        "ir_r2": 60.0,
        "ir_r4": 100.0,
    }
    assert r == pytest.approx({**expected, "r_mean": sum(expected.values()) / 6})
    # Neither the order of the texts nor that of the images changes a tie-aware rank.
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert recall_at_k(SCORES[:, perm], [TEXT_TO_IMAGE[i] for i in perm], ks=(1, 2, 4)) == pytest.approx(r)
    assert set(recall_at_k(SCORES, TEXT_TO_IMAGE)) == {
        "tr_r1",
        "tr_r5",
        "tr_r10",
        "ir_r1",
        "ir_r5",
        "ir_r10",
        "r_mean",
    }


def test_recall_uses_separate_t2i_scores():
    t2i = torch.zeros(5, 3, dtype=torch.float64)
    t2i[torch.arange(5), torch.tensor(TEXT_TO_IMAGE)] = 1.0  # every text ranks its own image first
    r = recall_at_k(SCORES, TEXT_TO_IMAGE, ks=(1,), scores_t2i=t2i)
    assert r["ir_r1"] == 100.0 and r["tr_r1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="at least one text"):
        recall_at_k(SCORES[:, :2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(SCORES.clone().fill_(float("nan")), TEXT_TO_IMAGE)


def itm_table(n_img: int, n_txt: int, calls: list | None = None):
    """A fixed 'ITM head': a random (n_img, n_txt) score table looked up pair by pair."""
    table = torch.randn(n_img, n_txt, generator=torch.Generator().manual_seed(1))

    def score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(images.numel())
        return table[images, texts]

    return table, score


def test_rerank_with_k_n_is_ranking_every_pair_by_itm():
    itc = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    calls = []
    table, score = itm_table(4, 9, calls)
    i2t, t2i = rerank(itc, k=9, itm_score_fn=score, chunk_size=5)
    torch.testing.assert_close(i2t, table)
    torch.testing.assert_close(t2i, table.t())
    assert max(calls) <= 5 and sum(calls) == 2 * 36 and len(calls) == 2 * 8
    t2img = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert recall_at_k(i2t, t2img, scores_t2i=t2i) == recall_at_k(table, t2img)


def test_rerank_top_k_only():
    itc = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    table, score = itm_table(4, 9)
    i2t, t2i = rerank(itc, k=2, itm_score_fn=score, itc_weight=1.0)
    for row, itc_row, itm_row in ((i2t, itc, table), (t2i, itc.t(), table.t())):
        kept = row != LOW_SCORE
        assert kept.sum(1).tolist() == [2] * row.shape[0]
        top2 = itc_row.topk(2, dim=1).indices
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, top2, True))
        torch.testing.assert_close(row[kept], (itm_row + itc_row)[kept])


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_partial_reranks_combine_to_the_full_one(world_size):
    itc = torch.randn(5, 11, generator=torch.Generator().manual_seed(2))
    _, score = itm_table(5, 11)
    full = rerank(itc, k=3, itm_score_fn=score, chunk_size=4)
    parts = [rerank(itc, 3, score, chunk_size=4, rank=r, world_size=world_size) for r in range(world_size)]
    for side in (0, 1):
        assert torch.equal(combine_partial([p[side] for p in parts]), full[side])
        n = full[side].shape[0]
        blocks = [row_block(n, r, world_size) for r in range(world_size)]
        assert sorted(i for b in blocks for i in b) == list(range(n))
        for p, b in zip(parts, blocks):  # each rank leaves the rows of the others untouched
            others = [i for i in range(n) if i not in b]
            assert (p[side][others] == LOW_SCORE).all()


# ---- the synthetic sets ----


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


SYN = {"num_train": 8, "num_val": 2, "num_test": 3, "image_size": 32}


def test_synthetic_coco_deterministic_and_read_back(tmp_path):
    a = make_synthetic_retrieval(str(tmp_path / "a"), seed=5, **SYN)
    b = make_synthetic_retrieval(str(tmp_path / "b"), seed=5, **SYN)
    c = make_synthetic_retrieval(str(tmp_path / "c"), seed=6, **SYN)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta == tb and ta["dataset_coco.json"] != tc["dataset_coco.json"]
    assert "train2014/COCO_train2014_000001000000.jpg" in ta
    assert "val2014/COCO_val2014_000001000003.jpg" in ta  # a restval image
    assert "val2014/COCO_val2014_000003000002.jpg" in ta  # the last test image
    train, counts = read_karpathy(a, "coco", "train")
    assert counts["images"] == 8 and counts["restval"] == 2 and counts["missing_image"] == 0
    test, _ = read_karpathy(a, "coco", "test")
    assert [im.image_id for im in test] == [3_000_000, 3_000_001, 3_000_002]
    lengths = [len(im.captions) for im in train + test]
    assert min(lengths) >= 3 and max(lengths) <= 6 and len(set(lengths)) > 1
    for split, images in (("train", train), ("test", test)):
        for index, im in enumerate(images):
            scene, _, captions = synthetic_example(5, split, index, 32)
            assert im.captions == tuple(captions) and len(set(captions)) == len(captions)
            for text in captions:  # every caption names exactly the scene's colours and kinds
                words = set(text.replace(";", " ").replace(",", " ").replace(":", " ").split())
                assert words & set(COLOURS) == {s["colour"] for s in scene["shapes"]}
                assert words & set(SHAPES) == {s["shape"] for s in scene["shapes"]}
    with pytest.raises(FileExistsError):
        make_synthetic_retrieval(a, seed=5, **SYN)


def test_synthetic_flickr_and_ensure(tmp_path):
    root = ensure_synthetic_retrieval(str(tmp_path), seed=1, dataset="flickr30k", **SYN)
    assert os.path.basename(root).startswith("retrieval-flickr30k-v1-seed1-")
    assert os.listdir(tmp_path) == [os.path.basename(root)]  # no temporary directory left behind
    test, _ = read_karpathy(root, "flickr30k", "test")
    assert [im.image_id for im in test] == [10, 11, 12]  # Flickr's imgid: the position in the file
    assert test[0].image_path == os.path.join(root, "flickr30k-images", "3000000.jpg")
    stamp = os.stat(os.path.join(root, "dataset_flickr30k.json")).st_mtime_ns
    assert ensure_synthetic_retrieval(str(tmp_path), seed=1, dataset="flickr30k", **SYN) == root
    assert os.stat(os.path.join(root, "dataset_flickr30k.json")).st_mtime_ns == stamp
    ds = RetrievalImageDataset(test, image_size=32)
    np.testing.assert_array_equal(ds[0]["image"].shape, (32, 32, 3))


def test_paraphrases_of_a_known_scene():
    scene = {
        "shapes": [
            {"colour": "red", "shape": "circle", "size": "large", "bbox": [2, 20, 28, 46]},
            {"colour": "blue", "shape": "square", "size": "small", "bbox": [40, 24, 54, 38]},
        ],
        "relations": [{"subject": 0, "relation": "left", "object": 1}],
    }
    captions = _multi_shape_paraphrases(scene, np.random.default_rng(0))
    assert captions[:3] == [
        "a large red circle to the left of a small blue square",
        "a small blue square with a large red circle to its left",
        "there is a small blue square; a red circle is to its left",
    ]
    assert captions[3] in (
        "a scene with a red circle and a blue square",
        "a scene with a blue square and a red circle",
    )
    assert captions[4:6] == [
        "a red circle left of a blue square",
        "the blue square is to the right of the red circle",
    ]
    assert captions[6].startswith("two shapes on a dark background: ")
