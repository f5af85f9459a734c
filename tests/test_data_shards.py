"""Shard conversion: every input format, every kind of bad input, exclusion, resume, the manifest, the CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import threading

import pytest
from conftest import read_tars
from PIL import Image

from eve_ds.data.manifest import DataError
from eve_ds.data.sources import make_shards
from eve_ds.data.writer import ShardStats, build_shards, shard_name, summary, write_tar


def load_tool(name: str):
    """tools/ is not a package; import a script from its path."""
    path = os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards_tool = load_tool("make_shards")


def jpeg(path, size=(16, 12), colour=(200, 30, 30), mode="RGB", fmt="JPEG"):
    Image.new(mode, size, colour if mode != "L" else 128).save(path, format=fmt)


@pytest.fixture
def images(tmp_path):
    """Ten good RGB JPEGs plus one image per bad or convertible kind, in tmp_path/img."""
    root = tmp_path / "img"
    root.mkdir()
    for i in range(10):
        jpeg(root / f"good{i}.jpg", colour=(20 * i, 100, 50))
    jpeg(root / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0))
    jpeg(root / "gray.png", mode="L", fmt="PNG")
    Image.new("P", (8, 8)).save(root / "palette.png")
    jpeg(root / "rgba.png", mode="RGBA", colour=(0, 0, 255, 128), fmt="PNG")
    good = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    jpeg(root / "bomb_warn.jpg", size=(40, 40))  # 1600 px: PIL warns above the limit (1000 in the test)
    jpeg(root / "bomb_error.jpg", size=(50, 50))  # 2500 px: PIL raises above twice the limit
    return root


def albef_items():
    items = [{"image": f"good{i}.jpg", "caption": f"photo number {i}"} for i in range(9)]
    items.append({"image": "good9.jpg", "caption": ["first caption", "second caption"]})
    bad = {
        "missing.jpg": "missing_file",
        "truncated.jpg": "unreadable_image",
        "garbage.jpg": "unreadable_image",
        "bomb_warn.jpg": "decompression_bomb",
        "bomb_error.jpg": "decompression_bomb",
    }
    items += [{"image": name, "caption": "a caption"} for name in bad]
    items += [{"image": "good0.jpg", "caption": ""}, {"image": "good1.jpg", "caption": "  \n\t "}]
    items += [
        {"image": f"{n}.{e}", "caption": f"{n} image"}
        for n, e in (("cmyk", "jpg"), ("gray", "png"), ("palette", "png"), ("rgba", "png"))
    ]
    return items


def test_albef_json_with_every_bad_kind(tmp_path, images):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(albef_items()))
    out = str(tmp_path / "out")
    manifest = make_shards(
        "albef-json", str(ann), str(images), out, samples_per_shard=4, source="vg", max_image_pixels=1000
    )
    assert manifest["skipped"] == {
        "decompression_bomb": 2,
        "empty_caption": 2,
        "missing_file": 1,
        "unreadable_image": 2,
    }
    assert manifest["converted"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    assert manifest["num_samples"] == 11 + 4  # 9 + a caption list of two + 4 converted
    assert manifest["sources"] == {"vg": 15}
    # 22 records in shards of 4
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 15
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    samples = read_tars(out)
    assert len(samples) == 15
    captions = {s["txt"].decode() for s in samples.values()}
    assert captions == {f"photo number {i}" for i in range(9)} | {
        "first caption",
        "second caption",
        "cmyk image",
        "gray image",
        "palette image",
        "rgba image",
    }
    for key, s in samples.items():
        assert set(s) == {"jpg", "txt", "json"}
        meta = json.loads(s["json"])
        assert meta["source"] == "vg" and meta["key"] == key and meta["path"]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
    # An RGB JPEG needing no resize is stored byte for byte.
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert by_caption["photo number 3"]["jpg"] == (images / "good3.jpg").read_bytes()
    # Every skipped input is named next to the manifest, in annotation order, with its reason.
    skipped = read_skipped(out)
    assert len(skipped) == sum(manifest["skipped"].values())
    assert [(s["index"], s["image"], s["reason"]) for s in skipped] == [
        (11, "missing.jpg", "missing_file"),
        (12, "truncated.jpg", "unreadable_image"),
        (13, "garbage.jpg", "unreadable_image"),
        (14, "bomb_warn.jpg", "decompression_bomb"),
        (15, "bomb_error.jpg", "decompression_bomb"),
        (16, "good0.jpg", "empty_caption"),
        (17, "good1.jpg", "empty_caption"),
    ]
    assert {s["input"] for s in skipped} == {str(ann)} and skipped[0]["id"] == "10"
    assert f"(each named in {out}/skipped.jsonl)" in summary(manifest, out)


def read_skipped(out: str) -> list[dict]:
    with open(os.path.join(out, "skipped.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_coco_with_exclude_and_resize(tmp_path, images):
    jpeg(images / "big.jpg", size=(80, 40))
    coco = {
        "images": [
            {"id": 1, "file_name": "good1.jpg"},
            {"id": 2, "file_name": "good2.jpg"},
            {"id": 3, "file_name": "big.jpg"},
        ],
        "annotations": [{"id": 10 + i, "image_id": 1 + i % 3, "caption": f"caption {i}"} for i in range(9)],
    }
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(coco))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# test images\nsub/dir/good2.jpg\n")  # matched by basename
    out = str(tmp_path / "out")
    manifest = make_shards("coco", str(ann), str(images), out, exclude=str(exclude), resize_short_side=20)
    assert manifest["skipped"] == {"excluded": 3}
    assert manifest["num_samples"] == 6 and manifest["sources"] == {"captions": 6}
    samples = read_tars(out)
    paths = {json.loads(s["json"])["path"] for s in samples.values()}
    assert paths == {"good1.jpg", "big.jpg"}
    ids = {json.loads(s["json"])["id"] for s in samples.values()}
    assert ids == {str(10 + i) for i in range(9) if i % 3 != 1}
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in samples.values()}
    assert sizes == {(16, 12), (40, 20)}  # the big one resized to a short side of 20, the small one kept
    assert [(s["index"], s["image"], s["reason"]) for s in read_skipped(out)] == [
        (i, "good2.jpg", "excluded") for i in (1, 4, 7)
    ]


def test_csv_tsv_columns_and_undecodable_text(tmp_path, images):
    tsv = tmp_path / "cc3m.tsv"
    rows = [
        b"caption\tfilepath",
        b"a red photo\tgood1.jpg",
        b"caf\xe9 latte\tgood2.jpg",
        b"\tgood3.jpg",
        "naïve café\tgood4.jpg".encode(),
    ]
    tsv.write_bytes(b"\n".join(rows) + b"\n")
    out = str(tmp_path / "out")
    assert (
        make_shards_tool.main(
            [
                "--format",
                "csv",
                "--input",
                str(tsv),
                "--image-root",
                str(images),
                "--output",
                out,
                "--image-column",
                "filepath",
                "--source",
                "cc3m",
            ]
        )
        == 0
    )
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["skipped"] == {"empty_caption": 1, "undecodable_text": 1}
    assert sorted(s["txt"].decode() for s in read_tars(out).values()) == ["a red photo", "naïve café"]


def test_cli_rejects_unusable_arguments(tmp_path, images):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("url,text\nx.jpg,hello\n")
    base = ["--image-root", str(images), "--output", str(tmp_path / "o")]
    assert make_shards_tool.main(["--format", "csv", "--input", str(csv_file), *base]) == 2  # bad columns
    assert make_shards_tool.main(["--format", "coco", "--input", str(tmp_path / "nope.json"), *base]) == 2
    with pytest.raises(SystemExit):
        make_shards_tool.main(["--format", "parquet", "--input", str(csv_file), *base])


def test_interrupted_run_resumes(tmp_path, images):
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            [{"image": f"good{i % 10}.jpg", "caption": f"c {i}"} for i in range(23)]
            + [{"image": "gray.png", "caption": "gray"}]
        )
    )
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    make_shards("albef-json", str(ann), str(images), ref, samples_per_shard=5)
    make_shards("albef-json", str(ann), str(images), out, samples_per_shard=5)
    # Simulate a kill while the last shard was being written: no final tar, a partial file, no manifest.
    os.rename(os.path.join(out, "shard-000004.tar"), os.path.join(out, "shard-000004.tar.partial"))
    os.remove(os.path.join(out, "manifest.json"))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    manifest = make_shards("albef-json", str(ann), str(images), out, samples_per_shard=5)
    after = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    assert all(after[n] == t for n, t in before.items())  # complete shards were not rewritten
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no leftovers
    for name in after:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(ref, name), "rb") as b:
            assert a.read() == b.read()
    assert manifest["num_samples"] == 24 and manifest["converted"] == {"L": 1}
    with pytest.raises(DataError, match="other arguments"):
        make_shards("albef-json", str(ann), str(images), out, samples_per_shard=6)


def test_parallel_workers_match_serial(tmp_path, images):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"good{i}.jpg", "caption": f"c {i}"} for i in range(10)]))
    a = make_shards("albef-json", str(ann), str(images), str(tmp_path / "a"), samples_per_shard=3)
    b = make_shards("albef-json", str(ann), str(images), str(tmp_path / "b"), samples_per_shard=3, workers=2)
    assert a["shards"] == b["shards"]
    assert read_tars(str(tmp_path / "a")) == read_tars(str(tmp_path / "b"))


# A module-level lock: held by the test while the shard pool runs. A forked worker would inherit it held.
_PARENT_LOCK = threading.Lock()


def _lock_probing_job(index: int, job: int, path: str) -> ShardStats:
    if not _PARENT_LOCK.acquire(timeout=10):
        raise RuntimeError("the shard worker inherited a lock held in the parent (a fork, not a spawn)")
    _PARENT_LOCK.release()
    write_tar(path, [])
    return ShardStats(shard_name(index), 0)


def test_shard_workers_do_not_inherit_held_locks(tmp_path):
    """Workers are spawned: a fork copies locks that another thread holds (logging, a tokenizer's pool,
    torch), and a worker that needs one then waits forever — the rare hang of a full test run."""
    with _PARENT_LOCK:
        manifest = build_shards(
            str(tmp_path / "out"), [0, 1, 2], _lock_probing_job, workers=2, fingerprint={"test": 1}
        )
    assert [s["name"] for s in manifest["shards"]] == [shard_name(i) for i in range(3)]


def test_cli_empty_corpus_is_an_error_naming_the_skipped_list(tmp_path, images, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"gone{i}.jpg", "caption": "a photo"} for i in range(4)]))
    out = tmp_path / "out"
    argv = ["--format", "albef-json", "--input", str(ann), "--image-root", str(images), "--output", str(out)]
    assert make_shards_tool.main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and err.count("error:") == 1
    assert line.startswith("eve-make-shards: error: the corpus is empty: all 4 inputs were skipped")
    assert f"{out}/skipped.jsonl" in line and "missing_file=4" in line and "--image-root" in line
    # The outputs are written all the same: the list says why each input is missing.
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 0
    assert [s["reason"] for s in read_skipped(str(out))] == ["missing_file"] * 4
    ann.write_text("[]")
    assert make_shards_tool.main([*argv[:-1], str(tmp_path / "none")]) == 2
    assert "holds no image-caption records" in capsys.readouterr().err
