"""The opt-in row kinds of evlm_synthetic (task.synthetic_extra_kinds): grounding boxes as text,
interleaved two-image rows, moving-shape videos, their masks, their evaluation prompts and metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import open_gates

from eve_ds.models.evlm.config import evlm_tiny
from eve_ds.models.evlm.model import EVLMModel
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.evlm_synthetic.data import (
    EOS,
    GRID,
    MIX,
    VIDEO_FRAMES,
    VOCAB,
    CaptionScenes,
    box_from_words,
    box_words,
    collate,
    ensure_tokenizer,
)
from eve_ds.tasks.evlm_synthetic.eval import (
    ExtraImages,
    Prompt,
    decode,
    extra_metrics,
    extra_prompts,
    scene_prompts,
    tower_features,
)
from eve_ds.tasks.evlm_synthetic.metrics import box_iou, grounding_scores
from eve_ds.train.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = {"grounding": 0.25, "interleaved": 0.25, "video": 0.25}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ensure_tokenizer(str(tmp_path_factory.mktemp("tok")))


def text_of(row, labelled: bool = False) -> list[str]:
    ids = row["input_ids"][row["labels"] >= 0] if labelled else row["input_ids"]
    return [VOCAB[t] for t in ids.tolist() if VOCAB[t] != "<|evlm_media|>"]


def test_rows_of_the_usual_kinds_are_bit_for_bit_those_of_a_run_without_opt_in_kinds(tok):
    plain = CaptionScenes(120, "train", 3, 64, tok, 8)
    mixed = CaptionScenes(120, "train", 3, 64, tok, 8, extra_kinds=ALL)
    kinds = set()
    for i in range(120):
        a, b = plain[i], mixed[i]
        kinds.add(b["kind"])
        if b["kind"] in MIX:
            assert a["kind"] == b["kind"] and torch.equal(a["image"], b["image"])
            assert all(torch.equal(a["row"][k], b["row"][k]) for k in a["row"])
            assert torch.equal(b["media"], b["image"][None])
    assert kinds == {*MIX, *ALL}
    # Shares: every row of the one kind asked for; the rest of the mix with share 0 kinds dropped.
    only = CaptionScenes(20, "train", 3, 64, tok, 8, extra_kinds={"video": 1.0, "grounding": 0.0})
    assert {only[i]["kind"] for i in range(20)} == {"video"} and only.extra_kinds == {"video": 1.0}


def test_grounding_rows_answer_the_box_on_the_lattice_and_label_only_it(tok):
    ds = CaptionScenes(60, "train", 0, 64, tok, 8, extra_kinds={"grounding": 1.0})
    for i in range(60):
        item = ds[i]
        answer = text_of(item["row"], labelled=True)
        assert answer[-1] == EOS and len(answer) == 5
        colour, shape = text_of(item["row"])[4:6]  # question: where is the <colour> <shape> ? answer: ...
        (target,) = [s for s in item["scene"]["shapes"] if (s["colour"], s["shape"]) == (colour, shape)]
        assert answer[:4] == box_words(target["bbox"], 64)
        box = box_from_words(answer[:4], 64)
        assert max(abs(a - b) for a, b in zip(box, target["bbox"])) <= 64 / GRID / 2
    assert box_from_words(["1", "2", "3"], 64) is None and box_from_words(["1", "2", "3", "red"], 64) is None
    assert box_from_words(["0", "0", str(GRID + 1), "4"], 64) is None


def test_interleaved_rows_read_each_caption_s_own_image_and_label_both_captions(tok):
    ds = CaptionScenes(40, "train", 0, 64, tok, 8, extra_kinds={"interleaved": 1.0})
    item = ds[0]
    row, media = item["row"], item["media"]
    assert media.shape == (2, 3, 64, 64) and torch.equal(media[0], item["image"])
    second, image = ds.second_scene(0)
    assert torch.equal(media[1], torch.from_numpy(image).permute(2, 0, 1)) and item["second"] == second
    batch = collate([item])
    text = batch["token_kind"][0] == 0
    split = int((batch["input_ids"][0] == VOCAB.index("<eos>")).nonzero()[0])  # the first caption's end
    first, later = text.clone(), text.clone()
    first[split + 1 :], later[: split + 1] = False, False
    assert (batch["lo"][0][first] == 0).all() and (batch["hi"][0][first] == 0).all()
    assert (batch["lo"][0][later] == 1).all() and (batch["hi"][0][later] == 1).all()
    labelled = text_of(row, labelled=True)
    assert labelled.count(EOS) == 2 and "caption:" not in labelled


def test_videos_move_one_shape_over_a_still_background_and_the_question_reads_every_frame(tok):
    ds = CaptionScenes(40, "train", 0, 64, tok, 8, extra_kinds={"video": 1.0})
    seen = set()
    for i in range(40):
        item = ds[i]
        clip, frames = item["clip"], item["media"]
        seen.add(clip["direction"])
        assert frames.shape == (VIDEO_FRAMES, 3, 64, 64) and text_of(item["row"], True) == [
            clip["direction"],
            EOS,
        ]
        centre = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in clip["boxes"]]
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[clip["direction"]]
        steps = np.diff([c[axis] for c in centre]) * sign
        assert (steps > 0).all() and np.ptp([c[1 - axis] for c in centre]) == 0
        # The background is the same in every frame: outside the shape's path the frames are equal.
        x0, y0 = min(b[0] for b in clip["boxes"]), min(b[1] for b in clip["boxes"])
        x1, y1 = max(b[2] for b in clip["boxes"]), max(b[3] for b in clip["boxes"])
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert all(torch.equal(f[:, outside], frames[0][:, outside]) for f in frames)
    assert seen == {"left", "right", "up", "down"}
    batch = collate([ds[0], ds[1]])
    assert batch["num_slots"] == VIDEO_FRAMES and batch["image_slot"].tolist()[:2] == [[0, 0], [0, 1]]
    assert (batch["clip_of_slot"] >= 0).all()
    text = batch["token_kind"] == 0
    assert (batch["lo"][text] == 0).all() and (batch["hi"][text] == VIDEO_FRAMES - 1).all()
    media = batch["token_kind"] == 1
    assert torch.equal(batch["lo"][media], batch["media_slot"][media])  # a frame's tokens: their frame only


def test_text_only_rows_of_every_kind_have_no_media_and_label_every_token(tok):
    ds = CaptionScenes(30, "train", 0, 64, tok, 8, text_only=True, extra_kinds=ALL)
    for i in range(30):
        item = ds[i]
        assert item["media"] is None and (item["row"]["labels"] >= 0).all()
        assert (item["row"]["input_ids"] != VOCAB.index("<|evlm_media|>")).all()
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape[0] == 0 and batch["image_slot"].shape == (0, 2)


def test_the_config_names_a_bad_kind_or_share(tmp_path):
    cfg = load_config("evlm_tiny_synthetic", ["task.synthetic_extra_kinds={video: 0.5, grounding: 0}"])
    assert cfg.task.synthetic_extra_kinds == {"video": 0.5, "grounding": 0.0}
    for bad, what in (("{audio: 0.1}", "audio"), ("{video: 1.5}", "task.synthetic_extra_kinds.video"),
                      ("{video: 0.6, grounding: 0.6}", "<= 1"), ("{video: lots}", "expected a number"),
                      ("[video]", "expected a mapping")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(what)):
            load_config("evlm_tiny_synthetic", [f"task.synthetic_extra_kinds={bad}"])
    with pytest.raises(ConfigError, match="only task evlm_synthetic"):
        TaskConfig(name="vqa", synthetic=True, synthetic_extra_kinds={"video": 0.5}).validate()


def test_grounding_and_video_metrics_on_hand_made_answers():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 10, 10], [10, 10, 5, 5]) == 0.0  # an empty (inverted) box
    g = grounding_scores([[0, 0, 10, 10], None, [0, 0, 10, 20]], [[0, 0, 10, 10]] * 3)
    assert g == {"grounding_acc": pytest.approx(2 / 3), "grounding_iou": pytest.approx(0.5)}
    scene = {"shapes": [{"colour": "red", "shape": "circle", "size": "small", "bbox": [4, 8, 20, 24]}]}
    clip = {"shape": scene["shapes"][0], "direction": "left", "boxes": []}
    where = ExtraImages(1, False, VIDEO_FRAMES)
    prompts = extra_prompts(0, scene, ["grounding", "video"], 64, where, clip=clip)
    assert [p.kind for p in prompts] == ["grounding", "video"] and prompts[0].answer == "1 2 5 6"
    generated = [["1", "2", "5", "6"], ["left"]]
    assert extra_metrics(prompts, generated) == {
        "grounding_acc": 1.0,
        "grounding_iou": 1.0,
        "video_direction": 1.0,
    }
    assert extra_metrics(prompts[1:], [["right"]], reversed_images=True) == {"video_direction_reversed": 1.0}


def test_the_blind_control_gives_every_image_the_same_role_in_the_previous_scene():
    where = ExtraImages(3, True, 2)  # 3 stills, 3 second images, 3 clips of 2 frames
    assert [where.roll(j) for j in range(3)] == [2, 0, 1]
    assert [where.roll(where.second(k)) for k in range(3)] == [where.second(k) for k in (2, 0, 1)]
    assert [where.roll(where.frame(1, f)) for f in range(2)] == [where.frame(0, f) for f in range(2)]


def test_prompts_of_several_layouts_decode_together_as_each_alone_and_read_their_own_images():
    torch.manual_seed(0)
    model = EVLMModel(evlm_tiny(media_token_id=1)).eval()
    open_gates(model)  # the images must steer the tokens
    n = 3
    where = ExtraImages(n, True, VIDEO_FRAMES)
    rng = np.random.default_rng(0)
    prompts: list[Prompt] = []
    for k in range(n):
        scene = {"shapes": [{"colour": "red", "shape": "circle", "size": "small", "bbox": [4, 8, 20, 24]}],
                 "relations": []}  # fmt: skip
        clip = {"shape": scene["shapes"][0], "direction": "up", "boxes": []}
        prompts += scene_prompts(k, scene, rng, 0)[:2]
        prompts += extra_prompts(k, scene, ["grounding", "interleaved", "video"], 64, where, scene, clip)
    feats = tower_features(model, torch.randn(n * (2 + VIDEO_FRAMES), 3, 64, 64), 64)

    def images_of(p):
        return p.media or (p.scene,)

    together = decode(model, prompts, feats, images_of, 256)
    alone = [decode(model, [p], feats, images_of, 256)[0] for p in prompts]
    assert together == alone
    multi = [p for p in prompts if len(p.media) > 1]
    flipped = decode(model, multi, feats, lambda p: p.media[::-1], 256)
    assert flipped != [together[prompts.index(p)] for p in multi]  # the order of the images reaches the text


def test_the_frame_table_starts_at_zero_and_lets_the_text_read_the_order_of_the_frames(tok):
    """model.video_time_embed: with its table at zero the model is the one without it; trained (here: set at
    random), reversing a clip's frames changes what the text reads, and stills are untouched."""
    ds = CaptionScenes(6, "train", 0, 64, tok, 8, extra_kinds={"video": 0.5})
    batch = collate([ds[i] for i in range(6)])
    assert batch["num_slots"] == VIDEO_FRAMES and {ds[i]["kind"] for i in range(6)} >= {"video"}
    batch["images"] = batch.pop("image").float() / 255
    logits = {}
    for frames in (0, VIDEO_FRAMES):
        torch.manual_seed(0)
        model = EVLMModel(evlm_tiny(media_token_id=1, video_time_embed=frames)).eval()
        open_gates(model)  # the images must steer the tokens
        with torch.no_grad():
            logits[frames] = model(batch).logits
    assert torch.equal(logits[0], logits[VIDEO_FRAMES])
    assert any(p is model.time_embed for p in model.trainable_parameters("stage1")["fusion"])
    with torch.no_grad():
        model.time_embed.normal_()
        video = [i for i in range(6) if ds[i]["kind"] == "video"]
        order = torch.arange(len(batch["images"]))
        for i in video:  # reverse every clip's frames
            rows = (batch["image_slot"][:, 0] == i).nonzero().flatten()
            order[rows] = rows.flip(0)
        forward = model(batch).logits
        backward = model({**batch, "images": batch["images"][order]}).logits
    still = [i for i in range(6) if i not in video]
    assert not torch.allclose(forward[video], backward[video])
    torch.testing.assert_close(forward[still], logits[0][still])
    with pytest.raises(ValueError, match=re.escape("a clip of 4 frames; model.video_time_embed=2")):
        EVLMModel(evlm_tiny(media_token_id=1, video_time_embed=2))(batch)
