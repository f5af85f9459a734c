"""The tiny EVLM demonstration: stage 0 chained before the run, the synthetic rows, greedy decoding with
the KV cache, and the generation metrics on hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import open_gates
from transformers import AutoModelForCausalLM

from eve_ds.cli.pretrain import main
from eve_ds.data.scene_text import absent_object, objects, parse_objects, popular_pairs
from eve_ds.data.synthetic import make_scene
from eve_ds.models.evlm.config import evlm_tiny
from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.models.evlm.model import EVLMModel
from eve_ds.tasks.evlm_synthetic.data import EOS, VOCAB, CaptionScenes, ensure_tokenizer, words
from eve_ds.tasks.evlm_synthetic.metrics import cider_bleu, exact_match, object_f1, pope_scores

pytestmark = pytest.mark.usefixtures("one_thread")

CONTRACT = ("cider", "cider_blind", "vqa_colour", "vqa_colour_blind", "object_f1", "object_f1_blind",
            "pope_acc", "pope_yes_ratio")  # fmt: skip


def test_object_f1_pope_and_exact_match_on_hand_made_inputs():
    a, b, c = ("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "diamond")
    m = object_f1([{a, c}, set()], [{a, b}, {c}])  # 1 hit, 2 predicted, 3 true
    assert m["object_precision"] == 0.5 and m["object_recall"] == pytest.approx(1 / 3)
    assert m["object_f1"] == pytest.approx(0.4)
    assert parse_objects("a small red circle to the left of a large blue square") == {a, b}
    p = pope_scores(["yes", "yes", "no", "maybe"], ["yes", "no", "no", "yes"])
    assert p["pope_yes_ratio"] == 0.5 and p["pope_acc"] == 0.5 and p["pope_precision"] == 0.5
    assert p["pope_recall"] == 0.5 and p["pope_f1"] == 0.5
    e = exact_match([("colour", "red", "red"), ("colour", "blue", "red"), ("size", "small", "small")])
    assert e == {"vqa": pytest.approx(2 / 3), "vqa_colour": 0.5, "vqa_size": 1.0}


def test_cider_is_positive_for_a_perfect_caption_and_zero_for_a_wrong_one():
    refs = {0: ["a small red circle", "there is a small red circle"], 1: ["a large blue square above it"]}
    perfect = cider_bleu({0: "a small red circle", 1: "a large blue square above it"}, refs)
    wrong = cider_bleu({0: "green green", 1: "purple"}, refs)
    assert perfect["cider"] > 1.0 and perfect["bleu4"] > 0.9
    assert wrong["cider"] == 0.0 and wrong["cider"] < perfect["cider"]


def test_pope_samplers_pick_absent_objects_and_adversarial_ones_share_an_attribute():
    rng = np.random.default_rng(0)
    popular = popular_pairs(0)
    assert len(popular) == 28 and len(set(popular)) == 28
    for i in range(50):
        scene = make_scene(np.random.default_rng([0, 9, i]))
        present = {(c, k) for _, c, k in objects(scene)}
        for sampler in ("random", "popular", "adversarial"):
            assert absent_object(scene, rng, sampler, popular) not in present
        c, k = absent_object(scene, rng, "adversarial", popular)
        assert any(c == pc or k == pk for pc, pk in present)


def test_rows_tokenise_without_unknown_words_and_label_only_the_answer(tmp_path):
    tok = ensure_tokenizer(str(tmp_path / "tok"))
    ds = CaptionScenes(200, "train", 0, 64, tok, 8)
    kinds = set()
    for i in range(200):
        item = ds[i]
        kinds.add(item["kind"])
        row = item["row"]
        assert (row["input_ids"][8:] != VOCAB.index("<pad>")).all()  # no unknown word (unk = pad)
        target = [VOCAB[t] for t in row["labels"][row["labels"] >= 0].tolist()]
        assert target[-1] == EOS and (item["kind"] == "caption" or len(target) == 2)
    assert kinds == {"caption", "vqa", "pope"}
    text = CaptionScenes(4, "train", 0, 64, tok, 8, text_only=True)[0]
    assert text["image"] is None and (text["row"]["labels"] >= 0).all()  # stage 0: every token
    assert words("is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]


def test_greedy_decoding_with_the_kv_cache_equals_recomputing_without_it():
    torch.manual_seed(0)
    model = EVLMModel(evlm_tiny(media_token_id=1)).eval()
    open_gates(model)  # the images must steer the tokens
    rows = [layout_row([[{"image": 0}, {"text": [3, 5 + i, 7]}]], 1, 8) for i in range(4)]
    batch = stack_rows(rows, 0)
    batch.update(images=torch.randn(4, 3, 64, 64), image_slot=torch.tensor([[i, 0] for i in range(4)]),
                 num_slots=1)  # fmt: skip
    cached = model.generate_greedy(batch, 10, eos_id=2, use_cache=True)
    recomputed = model.generate_greedy(batch, 10, eos_id=2, use_cache=False)
    assert cached.shape[0] == 4 and torch.equal(cached, recomputed)
    rolled = model.generate_greedy({**batch, "images": batch["images"].roll(1, 0)}, 10, eos_id=2)
    assert not torch.equal(rolled, cached)  # the media context reaches every step
    assert (cached != 1).all()  # the placeholder is never generated


def test_left_padded_prompts_of_several_lengths_decode_as_each_alone():
    torch.manual_seed(0)
    model = EVLMModel(evlm_tiny(media_token_id=1)).eval()
    open_gates(model)  # the images must steer the tokens
    prompts = [[3, 5, 7], [4, 6, 8, 9, 10, 11], [12], [5, 6, 7, 8]]
    rows = [layout_row([[{"image": 0}, {"text": p}]], 1, 8) for p in prompts]
    images = torch.randn(4, 3, 64, 64)
    steps: list[torch.Tensor] = []  # every decoding step's next-token logits (B, V)
    model.lm.register_forward_hook(lambda m, a, out: steps.append(out.logits[:, -1].detach()))

    def decode(batch, idx, **kw):
        steps.clear()
        n = len(idx)
        batch = {**batch, "images": images[idx], "image_slot": torch.tensor([[i, 0] for i in range(n)]),
                 "num_slots": 1}  # fmt: skip
        return model.generate_greedy(batch, 4, eos_id=2, **kw), torch.stack(steps, 1)  # (B, T), (B, T, V)

    alone = [decode(stack_rows([r], 0), [i]) for i, r in enumerate(rows)]
    batch = stack_rows(rows, 0, left=True)
    assert batch["attention_mask"][:, 0].tolist() == [0, 1, 0, 0] and batch["input_ids"][:, -1].tolist() == [
        7, 11, 12, 8,
    ]  # fmt: skip
    for use_cache in (True, False):
        tokens, logits = decode(batch, [0, 1, 2, 3], use_cache=use_cache)
        for i, (want_tokens, want_logits) in enumerate(alone):
            assert torch.equal(tokens[i], want_tokens[0]), (use_cache, i)
            torch.testing.assert_close(logits[i], want_logits[0], atol=2e-5, rtol=1e-4)
    _, unmasked = decode({k: v for k, v in batch.items() if k != "attention_mask"}, [0, 1, 2, 3])
    assert not torch.allclose(unmasked[0], alone[0][1][0], atol=1e-3)  # the padding would be read


@pytest.mark.slow
def test_a_short_demonstration_run_chains_stage0_and_writes_the_contract_metrics(tmp_path):
    run = tmp_path / "run"
    args = ["--config", "evlm_tiny_synthetic", "--run-dir", str(run), f"data.cache_dir={tmp_path}",
            "stage0.max_steps=6", "stage0.batch_size=16", "train.max_steps=6", "train.eval_every=6",
            "train.checkpoint_every=6", "task.synthetic_num_val=12", "train.micro_batch_size=8",
            "train.global_batch_size=8"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((run / "final_metrics.json").read_text())
    assert all(isinstance(m[k], float) for k in CONTRACT)
    assert 0 <= m["pope_yes_ratio"] <= 1 and 0 <= m["vqa_colour"] <= 1
    lm = AutoModelForCausalLM.from_pretrained(run / "lm", local_files_only=True)
    assert lm.config.vocab_size == 64 and (run / "lm" / "tokenizer.json").is_file()
    stage0 = json.loads((run / "stage0" / "final_metrics.json").read_text())
    assert stage0["step"] == 6 and stage0["caption_lm_loss"] < np.log(len(VOCAB))  # it learnt the text
    saved = json.loads((run / "checkpoints" / "step_00000006" / "eve_config.json").read_text())
    assert saved["sources"]["lm"]["path"] == str((run / "lm").resolve())
    # The stage-1 LM is the stage-0 one, frozen: equal to the saved files.
    ids = torch.randint(3, 40, (2, 7))
    trained = torch.load(Path(run / "stage0" / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"),
                         weights_only=False)["module"]  # fmt: skip
    key = "encoder.lm.model.layers.0.layer.mlp.up_proj.weight"
    assert torch.equal(trained[key], lm.model.layers[0].mlp.up_proj.weight)
    assert lm(ids).logits.isfinite().all()
    before = (run / "stage0" / "metrics.jsonl").read_text()
    assert main(args) == 0  # the finished run, again
    assert (run / "stage0" / "metrics.jsonl").read_text() == before  # stage 0 is not trained again
