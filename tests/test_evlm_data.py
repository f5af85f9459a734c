"""EVLM's data layer: readers of the official layouts, the packer, packed rows, collate, shards, the stream.

Fixtures are small files in each official layout, written here; the tokenizers are real ones saved with
save_pretrained (a word-level one, and the packaged BERT WordPiece); the model is evlm_tiny.
"""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import torch
from conftest import image_bytes, open_gates, read_tars
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from eve_ds.cli.make_shards import main as make_shards_main
from eve_ds.data.config import CorpusConfig, DataConfig
from eve_ds.data.documents import Document, Skip, box_text, read_documents
from eve_ds.data.manifest import DataError
from eve_ds.data.packed import (
    BadRow,
    RowReader,
    build_packed_loader,
    collate_packed,
    model_inputs,
    pack,
)
from eve_ds.data.packed_shards import make_packed_shards, tokenizer_record
from eve_ds.data.pipeline import PACKAGED_TOKENIZERS

pytestmark = pytest.mark.usefixtures("one_thread")

MEDIA, K, S = 63, 2, 16  # media placeholder id, tokens per image, image size of these tests
WORDS = ["a", "b", "c", "d", "red", "blue", "cat", "dog", "is", "the", "what", "colour", "?", "user:",
         "assistant:", "question:", "answer:", "moves", "left", "right", "system:", "hi"]  # fmt: skip


def save_word_tokenizer(path, words=WORDS) -> str:
    """A word-level tokenizer (<pad> 0, <eos> 1, <unk> 2, the words, the media token at 63)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    vocab["<|evlm_media|>"] = MEDIA
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def ids(tok, words: str) -> list[int]:
    return tok.convert_tokens_to_ids(words.split())


def write_images(root, names, colour=(200, 30, 30)):
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(root, n)) or root, exist_ok=True)
        with open(os.path.join(root, n), "wb") as f:
            f.write(image_bytes(colour, fmt="PNG", size=(24, 20)))


def row_sample(docs: list[dict], members: dict[str, bytes], key: str = "row0", **meta) -> dict:
    return {"__key__": key, "json": json.dumps({"version": 1, "samples": docs, **meta}).encode(), **members}


def doc(*segments, kind="interleaved") -> dict:
    return {"kind": kind, "source": "t", "id": "x", "segments": list(segments)}


# -- the packer ------------------------------------------------------------------------------------


def test_pack_is_greedy_in_order_within_both_budgets_and_skips_documents_too_long():
    sizes = [(5, 1), (4, 0), (3, 2), (10, 0), (11, 0), (1, 3), (2, 1), (2, 1)]
    out = pack(sizes, pack_tokens=10, max_images=2)
    assert out.rows == [[0, 1], [2], [3], [6, 7]] and out.too_long == [4, 5]
    rng = random.Random(0)
    sizes = [(rng.randint(1, 300), rng.randint(0, 5)) for _ in range(500)]
    out = pack(sizes, pack_tokens=256, max_images=4)
    assert [i for r in out.rows for i in r] == [i for i in range(500) if i not in out.too_long]
    for r in out.rows:
        assert sum(sizes[i][0] for i in r) <= 256 and sum(sizes[i][1] for i in r) <= 4
    # Greedy: the first document of each row did not fit into the row before it.
    for prev, row in zip(out.rows, out.rows[1:]):
        first = sizes[row[0]]
        assert (
            sum(sizes[i][0] for i in prev) + first[0] > 256 or sum(sizes[i][1] for i in prev) + first[1] > 4
        )
    assert all(sizes[i][0] > 256 or sizes[i][1] > 4 for i in out.too_long)


# -- collate ----------------------------------------------------------------------------------------


def test_collate_matches_a_hand_built_row(tok):
    png = image_bytes((10, 200, 30), size=(20, 30))
    row = row_sample(
        [doc({"text": "a b"}, {"image": "img0.jpg"}, {"text": "c"}),
         doc({"video": ["vid0.f00.jpg", "vid0.f01.jpg"]}, {"text": "d"}, kind="video")],
        {"img0.jpg": png, "vid0.f00.jpg": png, "vid0.f01.jpg": png},
    )  # fmt: skip
    text_only = row_sample(
        [doc({"role": "user", "text": "hi", "loss": False}, {"text": "b"})], {}, key="row1"
    )
    batch = collate_packed(
        [row, text_only], tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S
    )
    a, b, c, d, eos, hi, pad, M, X = *ids(tok, "a b c d <eos> hi <pad>"), MEDIA, -100
    assert batch["input_ids"].tolist() == [
        [a, b, M, M, c, eos, M, M, M, M, d, eos],
        [hi, b, eos, *[pad] * 9],
    ]
    assert batch["labels"].tolist() == [[a, b, X, X, c, eos, X, X, X, X, d, eos], [X, b, eos, *[X] * 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5] * 2, [0, 1, 2, *range(9)]]
    assert batch["lo"].tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 2, 2, 1, 1], [-1] * 12]
    assert batch["hi"].tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2], [-1] * 12]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, S, S)
    assert batch["images"][:, 1].float().mean().item() == pytest.approx(200, abs=1)  # green channel
    assert batch["image_slot"].tolist() == [[0, 0], [0, 1], [0, 2]]
    assert batch["num_slots"] == 3 and batch["num_skipped"] == 0 and batch["key"] == ["row0", "row1"]


def test_an_unreadable_or_missing_image_is_grey_its_text_unlabelled_and_counted(tok):
    good = image_bytes((10, 200, 30))
    row = row_sample(
        [doc({"image": "img0.jpg"}, {"text": "a b"}), doc({"image": "img1.jpg"}, {"text": "c"}),
         doc({"image": "img2.jpg"}, {"text": "d"})],
        {"img0.jpg": b"not an image", "img1.jpg": good},  # img2.jpg: absent from the tar
    )  # fmt: skip
    batch = collate_packed([row], tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S)
    assert batch["input_ids"].shape == (1, 3 * K + 2 + 1 + 1 + 1 + 1 + 1)  # the row keeps its shape
    assert (batch["images"][0] == 128).all() and (batch["images"][2] == 128).all()
    assert not (batch["images"][1] == 128).all()
    labels = batch["labels"][0].tolist()
    assert labels[: K + 3] == [-100] * (K + 3)  # document 0's text: not learned
    assert labels[K + 3 : 2 * K + 5] == [-100] * K + ids(tok, "c <eos>")
    assert labels[2 * K + 5 :] == [-100] * (K + 2)
    assert batch["num_skipped"] == 2
    assert [(s.key, s.reason) for s in batch["skipped"]] == [
        ("row0.img0.jpg", "unreadable_image"),
        ("row0.img2.jpg", "missing_image"),
    ]


@pytest.mark.parametrize(
    "sample, match",
    [
        ({"__key__": "k7", "json": b"{not json"}, "JSON does not parse .*k7"),
        ({"__key__": "k7"}, "without a json member .*k7"),
        ({"__key__": "k7", "json": b'{"version": 2, "samples": []}'}, "version 2 .*k7"),
        (row_sample([doc({"audio": "x.wav"})], {}, key="k7"), "unknown segment kind .*k7 sample 0 segment 0"),
    ],
)
def test_a_bad_row_is_one_error_naming_its_key(tok, sample, match):
    with pytest.raises(DataError, match=match):
        collate_packed([sample], tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S)


def test_rows_read_with_another_tokenizer_are_refused(tok, tmp_path):
    row = row_sample([doc({"text": "a b c"})], {}, num_tokens=4, num_media_tokens=K)
    reader = RowReader(tok, MEDIA, K, S)
    assert reader(row).layout["input_ids"].shape == (4,)
    other = AutoTokenizer.from_pretrained(os.path.normpath(PACKAGED_TOKENIZERS["bert-base-uncased"]))
    with pytest.raises(DataError, match="packed to 4 tokens, this tokenizer gives 5"):
        RowReader(other, MEDIA, K, S)(
            row_sample([doc({"text": "a b c d"})], {}, num_tokens=4, num_media_tokens=K)
        )


# -- readers on fixtures in the official layouts ----------------------------------------------------


def docs_and_skips(items) -> tuple[list[Document], list[Skip]]:
    items = list(items)
    return [d for d in items if isinstance(d, Document)], [s for s in items if isinstance(s, Skip)]


def test_obelics_and_mmc4_interleaved(tmp_path):
    write_images(tmp_path, ["p1.jpg", "p2.jpg"])
    lines = [
        json.dumps({"texts": [None, "a red cat", "is", None, "the dog"], "images": ["p1.jpg", None, None, "p2.jpg", None]}),
        json.dumps({"text_list": ["first one.", "second one."], "url": "http://x/1",
                    "image_info": [{"image_name": "p2.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}),
        "{truncated",
        json.dumps({"texts": [None, "gone"], "images": ["missing.jpg", None]}),
    ]  # fmt: skip
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    docs, skips = docs_and_skips(
        read_documents("interleaved", str(tmp_path / "docs.jsonl"), str(tmp_path), source="s")
    )
    assert docs[0].segments == [{"image": "p1.jpg"}, {"text": "a red cat is", "loss": True}, {"image": "p2.jpg"},
                                {"text": "the dog", "loss": True}]  # fmt: skip
    assert docs[1].id == "http://x/1" and docs[1].segments == [
        {"text": "first one.", "loss": True}, {"image": "p2.jpg"}, {"text": "second one.", "loss": True}
    ]  # fmt: skip
    assert [(s.index, s.reason, s.image) for s in skips] == [
        (2, "malformed_json", None),
        (3, "missing_file", "missing.jpg"),
    ]
    (tmp_path / "bad.json").write_text(json.dumps([{"sentences": ["x"]}]))
    with pytest.raises(DataError, match=r"item 0 is neither OBELICS nor MMC4 \(.*bad.json"):
        list(read_documents("interleaved", str(tmp_path / "bad.json"), str(tmp_path), source="s"))


def test_caption_and_vqa(tmp_path):
    write_images(tmp_path, ["i.jpg"])
    caps = [{"image": "i.jpg", "caption": ["a  cat", "a dog", " "]}, {"image": "gone.jpg", "caption": "x"}]
    (tmp_path / "cap.json").write_text(json.dumps(caps))
    docs, skips = docs_and_skips(
        read_documents("caption", str(tmp_path / "cap.json"), str(tmp_path), source="c")
    )
    assert [d.segments for d in docs] == [
        [{"image": "i.jpg"}, {"text": t, "loss": True}] for t in ("a cat", "a dog")
    ]
    assert [(s.index, s.reason) for s in skips] == [(2, "empty_caption"), (3, "missing_file")]
    vqa = [{"image": "i.jpg", "question": "what colour ?", "answer": ["red", "blue", "red"], "question_id": 5},
           {"image": "i.jpg", "question": "is it ?"}]  # fmt: skip
    (tmp_path / "vqa.json").write_text(json.dumps(vqa[:1]))
    (d,), _ = docs_and_skips(read_documents("vqa", str(tmp_path / "vqa.json"), str(tmp_path), source="v"))
    assert d.segments == [
        {"image": "i.jpg"},
        {"role": "user", "text": "question: what colour ? answer:", "loss": False},
        {"role": "assistant", "text": " red", "loss": True},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(vqa))
    with pytest.raises(DataError, match=r"item 1 has no usable 'answer' \(.*vqa.json"):
        list(read_documents("vqa", str(tmp_path / "vqa.json"), str(tmp_path), source="v"))


def test_grounding_refcoco_and_visual_genome(tmp_path):
    write_images(tmp_path, ["COCO_1.jpg", "VG_100K/7.jpg"])  # 24 x 20 pixels
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train", "sentences": [{"sent": "the  red cat"}]},
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "val", "sentences": [{"sent": "val only"}]},
    ]
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    inst = {"images": [{"id": 1, "file_name": "COCO_1.jpg", "width": 200, "height": 100}],
            "annotations": [{"id": 11, "bbox": [50, 25, 100, 50]}, {"id": 12, "bbox": [0, 0, 10, 10]}]}  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    (d,), _ = docs_and_skips(
        read_documents("grounding", str(tmp_path / "refs(unc).p"), str(tmp_path), source="r")
    )
    assert d.segments[1:] == [
        {"role": "user", "text": "<ref>the red cat</ref>", "loss": False},
        {"role": "assistant", "text": "<box>(250,250),(750,750)</box>", "loss": True},
    ]
    regions = [{"id": 7, "regions": [{"phrase": "a dog", "x": 0, "y": 0, "width": 24, "height": 10},
                                     {"phrase": "flat", "x": 3, "y": 3, "width": 0, "height": 4}]}]  # fmt: skip
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    (d,), _ = docs_and_skips(
        read_documents("grounding", str(tmp_path / "region_descriptions.json"), str(tmp_path), source="vg")
    )
    assert d.segments == [{"image": os.path.join("VG_100K", "7.jpg")},
                          {"role": "user", "text": "<ref>a dog</ref>", "loss": False},
                          {"role": "assistant", "text": "<box>(0,0),(999,500)</box>", "loss": True}]  # fmt: skip
    assert box_text("x", (199.9, 0, 0.1, 100), 200, 100)[1] == "<box>(999,0),(999,999)</box>"
    (tmp_path / "8.jpg").write_bytes(b"not an image")
    regions += [{"id": 8, "regions": regions[0]["regions"]}, {"id": 9, "regions": regions[0]["regions"]}]
    vg = str(tmp_path / "region_descriptions.json")
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    _, skips = docs_and_skips(read_documents("grounding", vg, str(tmp_path), source="vg"))
    assert [(s.index, s.reason) for s in skips] == [(1, "unreadable_image"), (2, "missing_file")]
    regions[0]["regions"][0].pop("x")
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    with pytest.raises(DataError, match=r"item 0: a region without phrase, x, y"):
        list(read_documents("grounding", vg, str(tmp_path), source="vg"))


def test_llava_conversations(tmp_path):
    write_images(tmp_path, ["i.jpg"])
    items = [
        {"id": "c1", "image": "i.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat is  it ?"}, {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "colour ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "c2", "image": "i.jpg", "conversations": [
            {"from": "human", "value": "<image> <image> two ?"}, {"from": "gpt", "value": "no"}]},
        {"id": "c3", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi"}]},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(items))
    docs, skips = docs_and_skips(
        read_documents("sft", str(tmp_path / "llava.json"), str(tmp_path), source="l")
    )
    u = {"role": "user", "loss": False}
    assert docs[0].segments == [
        {**u, "text": "user:"}, {"image": "i.jpg"}, {**u, "text": " what is it ?"}, {**u, "text": " assistant:"},
        {"role": "assistant", "text": " a cat", "loss": True},
        {**u, "text": "user:"}, {**u, "text": " colour ?"}, {**u, "text": " assistant:"},
        {"role": "assistant", "text": " red", "loss": True},
    ]  # fmt: skip
    assert docs[1].id == "c3" and not any("image" in s for s in docs[1].segments)
    assert [(s.id, s.reason) for s in skips] == [("c2", "image_placeholder_mismatch")]
    items[2]["conversations"][0]["from"] = "robot"
    (tmp_path / "llava.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"item 2 turn 0: unknown speaker 'robot' \(.*llava.json"):
        list(read_documents("sft", str(tmp_path / "llava.json"), str(tmp_path), source="l"))


def test_video_frame_folders(tmp_path):
    write_images(tmp_path, [f"clips/v1/{k:03d}.jpg" for k in range(5)])
    items = [{"video": "clips/v1", "caption": "the cat moves left", "fps": 10},
             {"video": "clips/v1", "conversations": [{"from": "human", "value": "<video> what ?"},
                                                     {"from": "gpt", "value": "left"}]},
             {"video": "clips/none", "caption": "x"}]  # fmt: skip
    (tmp_path / "v.json").write_text(json.dumps(items))
    docs, skips = docs_and_skips(
        read_documents("video", str(tmp_path / "v.json"), str(tmp_path), source="v", frames=3)
    )
    frames = [os.path.join("clips/v1", f"{k:03d}.jpg") for k in (0, 2, 4)]
    assert docs[0].segments == [{"video": frames, "fps": 6.0}, {"text": "the cat moves left", "loss": True}]
    assert docs[1].segments[1] == {"video": frames} and docs[1].segments[-1]["text"] == " left"
    assert [(s.index, s.reason) for s in skips] == [(2, "missing_file")]


# -- shards: make -> tar -> collate, the model, the stream -----------------------------------------


def sft_fixture(tmp_path) -> tuple[str, str]:
    """LLaVA JSON of 6 conversations (images of distinct colours) and one far too long."""
    root = tmp_path / "img"
    for i in range(6):
        write_images(root, [f"i{i}.jpg"], colour=(40 * i, 255 - 40 * i, 90))
    items = [
        {"id": f"c{i}", "image": f"i{i}.jpg", "conversations": [
            {"from": "human", "value": "<image> what colour ?" + " the" * i}, {"from": "gpt", "value": "red cat"}]}
        for i in range(6)
    ]  # fmt: skip
    items.insert(
        3,
        {
            "id": "long",
            "conversations": [{"from": "human", "value": "a " * 60}, {"from": "gpt", "value": "b"}],
        },
    )
    (tmp_path / "llava.json").write_text(json.dumps(items))
    return str(tmp_path / "llava.json"), str(root)


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, tok_dir):
    tmp = tmp_path_factory.mktemp("sft")
    ann, root = sft_fixture(tmp)
    out = str(tmp / "shards")
    argv = ["--format", "sft", "--input", ann, "--image-root", root, "--output", out, "--tokenizer", tok_dir,
            "--pack-tokens", "40", "--max-images", "2", "--media-tokens", str(K), "--samples-per-shard", "2"]  # fmt: skip
    assert make_shards_main(argv) == 0
    return out


def test_make_shards_packs_rows_writes_the_fingerprint_and_names_the_skips(sft_shards, tok_dir, tok):
    with open(os.path.join(sft_shards, "manifest.json")) as f:
        manifest = json.load(f)
    rows = read_tars(sft_shards)
    metas = [json.loads(r["json"]) for r in rows.values()]
    assert [[s["id"] for s in m["samples"]] for m in metas] == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]
    assert manifest["num_samples"] == 3 and manifest["sources"] == {"llava": 6}
    assert manifest["skipped"] == {"document_too_long": 1}
    args = manifest["arguments"]
    assert args["tokenizer"] == tokenizer_record(tok_dir, tok) and len(args["tokenizer"]["sha256"]) == 64
    assert args["tokenizer"]["name"] == os.path.basename(tok_dir)
    assert (args["pack_tokens"], args["max_images"], args["num_media_tokens"]) == (40, 2, K)
    with open(os.path.join(sft_shards, "skipped.jsonl")) as f:
        (line,) = [json.loads(x) for x in f]
    assert (line["id"], line["reason"], line["images"]) == ("long", "document_too_long", 0) and line[
        "tokens"
    ] > 40
    for m, r in zip(metas, rows.values()):
        assert m["num_tokens"] <= 40 and sorted(k for k in r if k != "json") == ["img0.jpg", "img1.jpg"]
    assert not [n for n in os.listdir(sft_shards) if n.endswith((".partial", ".tmp"))]


def test_make_shards_errors_are_one_line(tmp_path, tok_dir, capsys):
    base = ["--image-root", str(tmp_path), "--output", str(tmp_path / "o"), "--tokenizer", tok_dir]
    assert make_shards_main(["--format", "vqa", "--input", str(tmp_path / "none.json"), *base]) == 2
    assert "annotation file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_shards_main(["--format", "vqa", "--input", "x.json", "--output", str(tmp_path / "o")])
    assert "give --tokenizer DIR" in capsys.readouterr().err


def tiny_model():
    from eve_ds.models.evlm import EVLMModel, get_config

    torch.manual_seed(0)
    model = EVLMModel(get_config("evlm_tiny", media_token_id=MEDIA, num_media_tokens=K, image_size=S,
                                 vision_patch=8)).eval()  # fmt: skip
    open_gates(model, 1.0)  # the images must steer the tokens
    return model


def test_each_document_of_a_packed_row_gives_the_logits_it_gives_alone(sft_shards, tok):
    model = tiny_model()
    opts = dict(tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S)
    rows = list(read_tars(sft_shards).items())
    samples = [{"__key__": k, **r} for k, r in rows]
    batch = collate_packed(samples, **opts)
    with torch.no_grad():
        logits = model(model_inputs(batch)).logits  # (3, L, V)
    checked = 0
    for b, (key, members) in enumerate(rows):
        meta = json.loads(members["json"])
        start = 0
        for d in meta["samples"]:
            names = [s["image"] for s in d["segments"] if "image" in s]
            alone = collate_packed([row_sample([d], {n: members[n] for n in names}, key=key)], **opts)
            n = alone["input_ids"].shape[1]
            assert batch["input_ids"][b, start : start + n].tolist() == alone["input_ids"][0].tolist()
            with torch.no_grad():
                want = model(model_inputs(alone)).logits[0]
            torch.testing.assert_close(logits[b, start : start + n], want, atol=1e-5, rtol=0)
            start, checked = start + n, checked + 1
    assert checked == 6
    # The images matter: the documents' images rolled within the batch change the logits.
    rolled = model_inputs(batch)
    rolled["images"] = rolled["images"].roll(1, 0)
    with torch.no_grad():
        assert (model(rolled).logits - logits).abs().max() > 1e-3


def test_the_caption_lm_objective_trains_on_collated_rows(sft_shards, tok):
    from eve_ds.objectives import OBJECTIVES

    model = tiny_model().train()
    samples = [{"__key__": k, **r} for k, r in read_tars(sft_shards).items()]
    batch = collate_packed(samples, tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S)
    out = OBJECTIVES["caption_lm"](model.cfg, None)(model, model_inputs(batch))
    out["caption_lm_loss"].backward()
    assert torch.isfinite(out["caption_lm_loss"]) and model.media_tokens.grad.abs().sum() > 0


def test_the_stream_reads_one_row_per_slot_resumes_exactly_and_skips_bad_rows(sft_shards, tok, tmp_path):
    cfg = DataConfig(train=[CorpusConfig("sft", sft_shards)], num_workers=0)
    reader = RowReader(tok, MEDIA, K, S)
    loader = build_packed_loader(cfg, reader, batch_size=2, seed=3)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == {"llava-000000000", "llava-000000001", "llava-000000002"}
    assert all(b["input_ids"].shape[0] == 2 and b["num_skipped"] == 0 for b in batches)
    resumed = next(iter(build_packed_loader(cfg, reader, batch_size=2, seed=3, start_batch=3)))
    assert resumed["key"] == batches[3]["key"] and torch.equal(resumed["input_ids"], batches[3]["input_ids"])
    assert torch.equal(resumed["images"], batches[3]["images"])
    # A shard with a broken row: the slot is refilled from its block and counted.
    bad_dir = tmp_path / "bad"
    make_packed_shards_with_a_bad_row(sft_shards, bad_dir)
    cfg = DataConfig(train=[CorpusConfig("bad", str(bad_dir))], num_workers=0)
    batch = next(iter(build_packed_loader(cfg, reader, batch_size=2, seed=0)))
    assert batch["num_skipped"] == 1 and batch["skipped"][0].reason == "bad_row"
    assert batch["key"] == ["llava-000000000", "llava-000000000"]


def make_packed_shards_with_a_bad_row(src: str, dst) -> None:
    from eve_ds.data.writer import write_tar

    os.makedirs(dst)
    rows = read_tars(src)
    good = {"__key__": "llava-000000000", **rows["llava-000000000"]}
    write_tar(os.path.join(dst, "shard-000000.tar"), [good, {"__key__": "broken", "json": b"{"}])
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump({"num_samples": 2, "shards": [{"name": "shard-000000.tar", "num_samples": 2}]}, f)


def test_any_local_tokenizer_folder_packs_vqa(tmp_path):
    """The packaged BERT WordPiece folder as --tokenizer; its [SEP] closes the answer."""
    write_images(tmp_path, ["i.jpg"])
    items = [{"image": "i.jpg", "question": f"what colour is thing {i} ?", "answer": "red"} for i in range(5)]
    (tmp_path / "vqa.json").write_text(json.dumps(items))
    out = str(tmp_path / "out")
    manifest = make_packed_shards("vqa", str(tmp_path / "vqa.json"), str(tmp_path), out,
                                  tokenizer="bert-base-uncased", pack_tokens=64, max_images=64, num_media_tokens=4)  # fmt: skip
    assert manifest["num_samples"] == 2 and manifest["arguments"]["tokenizer"]["name"] == "bert-base-uncased"
    bert = AutoTokenizer.from_pretrained(os.path.normpath(PACKAGED_TOKENIZERS["bert-base-uncased"]))
    samples = [{"__key__": k, **r} for k, r in read_tars(out).items()]
    batch = collate_packed(samples, tokenizer=bert, media_token_id=1, num_media_tokens=4, image_size=S)
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert bert.convert_ids_to_tokens(labelled) == ["red", "[SEP]"] * 4  # 4 documents of 16 tokens


def test_reading_a_packed_corpus_needs_train_corpora(tok):
    with pytest.raises(DataError, match=r"data\.train is empty"):
        build_packed_loader(DataConfig(), RowReader(tok, MEDIA, K, S), batch_size=1)
    with pytest.raises(BadRow):
        RowReader(tok, MEDIA, K, S)({"__key__": "x", "json": b"[]"})


def test_the_trainer_batch_goes_through_batch_to_device_and_caption_lm(sft_shards, tok):
    from eve_ds.data.packed import trainer_batch
    from eve_ds.data.transforms import batch_to_device
    from eve_ds.objectives import OBJECTIVES

    model = tiny_model()
    samples = [{"__key__": k, **r} for k, r in read_tars(sft_shards).items()]
    batch = collate_packed(samples, tokenizer=tok, media_token_id=MEDIA, num_media_tokens=K, image_size=S)
    on_device = batch_to_device(trainer_batch(batch), "cpu")
    assert on_device["image"].dtype == torch.float32 and torch.equal(on_device["pixels"], batch["images"])
    objective = OBJECTIVES["caption_lm"](model.cfg, None)
    with torch.no_grad():
        got = objective(model, on_device)["caption_lm_loss"]
        want = objective(model, model_inputs(batch))["caption_lm_loss"]
    assert got.item() == want.item()


def test_shards_of_video_clips_and_documents_with_unreadable_images(tmp_path, tok_dir, tok):
    write_images(tmp_path, [f"clips/v{v}/{k}.jpg" for v in range(2) for k in range(4)])
    (tmp_path / "clips/v1/2.jpg").write_bytes(b"truncated")  # a frame that cannot be read
    items = [{"video": f"clips/v{v}", "caption": "the cat moves left"} for v in (0, 1, 0, 0)]
    (tmp_path / "v.json").write_text(json.dumps(items))
    out = str(tmp_path / "out")
    manifest = make_packed_shards("video", str(tmp_path / "v.json"), str(tmp_path), out, tokenizer=tok_dir,
                                  pack_tokens=64, max_images=8, num_media_tokens=K, reader_options={"frames": 4})  # fmt: skip
    # Rows [0, 1] and [2, 3] (8 frames each); clip 1 cannot be read, so the first row keeps clip 0 alone.
    assert manifest["skipped"] == {"unreadable_image": 1} and manifest["sources"] == {"v": 3}
    with open(os.path.join(out, "skipped.jsonl")) as f:
        (line,) = [json.loads(x) for x in f]
    assert (line["index"], line["reason"]) == (1, "unreadable_image") and "clips/v1/2.jpg" in line["image"]
    rows = list(read_tars(out).items())
    assert [len(json.loads(r["json"])["samples"]) for _, r in rows] == [1, 2]
    key, members = rows[1]
    meta = json.loads(members["json"])
    assert [s["segments"][0]["video"] for s in meta["samples"]] == [
        [f"vid{v}.f{k:02d}.jpg" for k in range(4)] for v in (0, 1)
    ]
    batch = collate_packed([{"__key__": key, **members}], tokenizer=tok, media_token_id=MEDIA,
                           num_media_tokens=K, image_size=S)  # fmt: skip
    n = 4 * K + 5  # 4 frames, "the cat moves left <eos>"
    lo, hi = batch["lo"][0].tolist(), batch["hi"][0].tolist()
    assert lo[:n] == [f for f in range(4) for _ in range(K)] + [0] * 5  # each frame sees itself, the text all
    assert hi[:n] == [f for f in range(4) for _ in range(K)] + [3] * 5
    assert lo[n:] == [f for f in range(4, 8) for _ in range(K)] + [4] * 5 and hi[n:][-1] == 7
    assert batch["clip_of_slot"][0].tolist() == [0] * 4 + [1] * 4 and batch["images"].shape[0] == 8
