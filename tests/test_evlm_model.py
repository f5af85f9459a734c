"""EVLM model library: identity at init, media masks, packing, freezing, local files, counts, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from eve_ds.models.evlm import EVLMModel, get_config, layout_row, param_counts, stack_rows
from eve_ds.models.evlm.counts import lm_params, vision_params, xattn_params
from eve_ds.models.evlm.masks import media_intervals
from eve_ds.models.evlm.vision import EVEVision, TimmVision
from eve_ds.models.evlm.xattn import GatedXAttn, build_ffn
from eve_ds.objectives import OBJECTIVES

pytestmark = pytest.mark.usefixtures("one_thread")
MEDIA, K = 63, 8  # the media placeholder id (the last embedding row) and tokens per image of evlm_tiny


def tiny_lm_config(kind: str = "qwen2"):
    cfg = dict(
        vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    return Qwen2Config(**cfg) if kind == "qwen2" else Qwen3Config(head_dim=32, **cfg)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny Qwen2 and a word-level tokenizer with the media token, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_lm_config()).save_pretrained(path)
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, MEDIA)}, "<|evlm_media|>": MEDIA}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(path)
    return path


def build(kind: str = "qwen2", gates: float = 0.0, **overrides) -> tuple[EVLMModel, torch.nn.Module]:
    """(EVLM model in eval mode, an untouched copy of its LM) for a random tiny LM of `kind`."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_lm_config(kind))
    bare = copy.deepcopy(lm).eval()
    layout = {
        "model_type": kind,
        **{
            k: v
            for k, v in tiny_lm_config(kind).to_dict().items()
            if k in ("hidden_size", "num_hidden_layers")
        },
    }
    cfg = get_config("evlm_tiny", media_token_id=MEDIA, gate_init=gates, **overrides)
    cfg.lm_layout.update(layout)
    return EVLMModel(cfg, lm=lm).eval(), bare


def batch_of(docs_per_row: list[list[list[dict]]], seed: int = 0) -> dict:
    rows = [layout_row(docs, MEDIA, K) for docs in docs_per_row]
    b = stack_rows(rows, pad_id=0)
    slots = [(r, s) for r, row in enumerate(rows) for s in range(len(row["clip_of_slot"]))]
    b["image_slot"] = torch.tensor(slots, dtype=torch.long).reshape(-1, 2)
    b["images"] = torch.randn(len(slots), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    b["num_slots"] = b["clip_of_slot"].shape[1]
    return b


def text(*ids: int, loss: bool = True) -> dict:
    return {"text": list(ids), "loss": loss}


INTERLEAVED = [[text(1, 2, 3), {"image": 0}, text(4, 5, 6, 7), {"image": 1}, text(8, 9)]]
TWO_ROWS = [INTERLEAVED, [[{"image": 0}, text(10, 11, 12)]]]


# -- identity at init --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_gates_at_zero_give_the_bare_lm_logits_exactly(kind):
    model, bare = build(kind)
    b = batch_of(TWO_ROWS)
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], torch.tensor([2, 1]))
        want = bare(inputs_embeds=embeds, position_ids=b["position_ids"], use_cache=False).logits
        assert torch.equal(model(b).logits, want)
        text_only = {k: b[k] for k in ("input_ids", "position_ids", "lo", "hi")}
        text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == MEDIA, 5)
        assert torch.equal(
            model(text_only).logits,
            bare(input_ids=text_only["input_ids"], position_ids=b["position_ids"]).logits,
        )
        for layer in model.layers:  # the test can fail: open gates change the logits
            layer.xattn.attn_gate.fill_(0.5)
        assert not torch.allclose(model(b).logits, want)


# -- masks -------------------------------------------------------------------------------------------


def test_text_never_sees_a_later_image():
    model, _ = build(gates=1.0)
    b = batch_of(TWO_ROWS)
    second = int((b["input_ids"][0] == MEDIA).nonzero()[K])  # first media token of image 1 in row 0
    with torch.no_grad():
        ref = model(b).logits
        b["images"][1] += 1.0  # row 0, image 1
        out = model(b).logits
    assert torch.equal(out[0, :second], ref[0, :second])
    assert torch.equal(out[1], ref[1])  # other rows
    assert (out[0, second:] - ref[0, second:]).abs().amax() > 1e-3


def test_text_reads_the_most_recent_image_of_its_document():
    b = batch_of([[[text(1), {"image": 0}, text(2, 3), {"image": 1}, text(4)], [text(5, 6)]]])
    lo, kind = b["lo"][0].tolist(), b["token_kind"][0].tolist()
    assert lo[0] == -1 and lo[1 : 1 + K] == [0] * K and lo[1 + K : 3 + K] == [0, 0]
    assert lo[3 + K : 3 + 2 * K] == [1] * K and lo[3 + 2 * K] == 1
    assert lo[-2:] == [-1, -1] and kind[-2:] == [0, 0]  # the second document saw no image of its own
    assert torch.equal(b["lo"], b["hi"])


def test_imageless_text_cross_attention_output_is_zero():
    torch.manual_seed(0)
    x = GatedXAttn(32, 24, 16, 2, build_ffn(32, 16, "swiglu"), gate_init=1.0)
    feats = torch.randn(2, 3, 5, 24)
    lo = torch.tensor([[-1, -1, 0, 1], [2, -1, -1, 0]])
    out = x.attend(torch.randn(2, 4, 32), feats, lo, lo)
    assert torch.equal(out[lo < 0], torch.zeros_like(out[lo < 0]))
    assert out[lo >= 0].abs().amin() > 0


def test_video_frames_see_their_frame_and_the_caption_sees_the_clip():
    b = batch_of([[[{"video": 3}, text(4, 5, 6)]]])
    lo, hi = b["lo"][0], b["hi"][0]
    frame = torch.arange(3).repeat_interleave(K)
    assert torch.equal(lo[: 3 * K], frame) and torch.equal(hi[: 3 * K], frame)
    assert lo[3 * K :].tolist() == [0] * 3 and hi[3 * K :].tolist() == [2] * 3
    torch.manual_seed(0)
    x = GatedXAttn(32, 24, 16, 2, build_ffn(32, 16, "swiglu"), gate_init=1.0)
    q, feats = torch.randn(1, len(lo), 32), torch.randn(1, 3, 5, 24)
    ref = x.attend(q, feats, lo[None], hi[None])
    feats[0, 1] += 1.0  # frame 1
    out = x.attend(q, feats, lo[None], hi[None])
    changed = (out - ref).abs().amax(-1)[0] > 0
    assert torch.equal(
        changed, (frame_or_caption := torch.cat([frame == 1, torch.ones(3, dtype=torch.bool)]))
    )
    assert frame_or_caption.any()


def test_packed_documents_equal_each_document_alone():
    model, _ = build(gates=1.0)
    doc_a, doc_b = [text(1, 2), {"image": 0}, text(3, 4)], [{"image": 0}, text(5, 6, 7)]
    packed, alone = batch_of([[doc_a, doc_b]]), batch_of([[doc_b]])
    alone["images"] = packed["images"][1:]
    with torch.no_grad():
        p, a = model(packed).logits, model(alone).logits
    n = a.shape[1]
    torch.testing.assert_close(p[0, -n:], a[0], atol=1e-5, rtol=0)
    doc_a_alone = batch_of([[doc_a]])
    doc_a_alone["images"] = packed["images"][:1]
    with torch.no_grad():
        torch.testing.assert_close(p[0, : p.shape[1] - n], model(doc_a_alone).logits[0], atol=1e-5, rtol=0)


# -- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gates", [0.0, 0.3])
def test_frozen_weights_get_no_gradient_and_trainable_ones_do(gates):
    model, _ = build(gates=gates)
    model.train()
    groups = model.trainable_parameters("stage1")
    objective = OBJECTIVES["caption_lm"](model.cfg, None)
    out = objective(model, batch_of(TWO_ROWS))
    out["caption_lm_loss"].backward()
    assert all(p.grad is None for p in model.lm.parameters() if not any(p is q for q in groups["fusion"]))
    assert all(p.grad is None for b in model.vision.blocks[:3] for p in b.parameters())
    # Closed gates pass no gradient to the tower (and the FFN) yet; tanh'(0) = 1 moves the gates at step 1.
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == (gates > 0) for p in groups["vision"][:4])
    assert all(layer.xattn.attn_gate.grad.abs() > 0 for layer in model.layers)
    assert model.media_tokens.grad is not None
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model, _ = build(gates=0.3)
        model.train().set_grad_checkpointing(ckpt)
        OBJECTIVES["caption_lm"](model.cfg, None)(model, batch_of(TWO_ROWS))["caption_lm_loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_caption_lm_loss_is_text_only_and_skips_document_starts():
    model, _ = build(gates=0.5)
    b = batch_of([[[text(1, 2, 3), {"image": 0}, text(4, 5)], [text(6, 7), text(8, 9, loss=False)]]])
    out = OBJECTIVES["caption_lm"](model.cfg, None)(model, b)
    logits, labels, pos = model(b).logits[0], b["labels"][0], b["position_ids"][0]
    want = [
        torch.nn.functional.cross_entropy(logits[t - 1 : t], labels[t : t + 1])
        for t in range(1, len(labels))
        if labels[t] != -100 and pos[t] != 0
    ]
    assert len(want) == 2 + 2 + 1  # 2, 3 | 4, 5 after the image | 7 (6 starts a document; 8, 9 are a prompt)
    torch.testing.assert_close(out["caption_lm_loss"], torch.stack(want).mean())


def test_a_batch_with_nothing_labelled_gives_a_zero_loss_and_zero_gradients():
    """Not an error: one rank's unlearnable micro-batch must not stop the others inside a collective."""
    model, _ = build(gates=0.5)
    model.train()
    b = batch_of([[[{"image": 0}, text(4, 5, loss=False)], [text(6, 7, loss=False)]]])
    out = OBJECTIVES["caption_lm"](model.cfg, None)(model, b)
    assert out["caption_lm_loss"].item() == 0.0 and out["caption_lm_tokens"].item() == 0.0
    out["caption_lm_loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


# -- local files -------------------------------------------------------------------------------------


def test_tiny_qwen2_and_tokenizer_load_from_local_files(lm_dir):
    # Not AutoTokenizer: next to a qwen2 config.json it builds a Qwen2Tokenizer that encodes these words as [].
    tok = PreTrainedTokenizerFast.from_pretrained(lm_dir, local_files_only=True)
    assert tok("w1 <|evlm_media|> w2")["input_ids"] == [1, MEDIA, 2]
    cfg = get_config("evlm_tiny", lm_path=str(lm_dir))
    model = EVLMModel(cfg)
    assert model.media_token_id == MEDIA
    saved = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    inner = {k.replace(".layer.", "."): v for k, v in model.lm.state_dict().items() if ".xattn." not in k}
    assert inner.keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in inner.items())
    with pytest.raises(ValueError, match="<\\|other\\|>"):
        EVLMModel(get_config("evlm_tiny", lm_path=str(lm_dir), media_token="<|other|>"))


# -- towers ------------------------------------------------------------------------------------------


def test_towers_return_one_level_per_feature_layer():
    vit = timm.create_model(
        "vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, num_classes=0
    )
    tower = TimmVision(vit, [3, 5])
    levels = tower(torch.randn(2, 3, 64, 64))
    assert [tuple(x.shape) for x in levels] == [(2, 65, 96)] * 2 and not torch.equal(*levels)
    eve = get_config("evlm_tiny", media_token_id=MEDIA, vision="eve", vision_width=128, vision_depth=4,
                     vision_patch=8, feature_layers=[1, 3])  # fmt: skip
    model = EVLMModel(eve, lm=AutoModelForCausalLM.from_config(tiny_lm_config()))
    assert isinstance(model.vision, EVEVision)
    assert [tuple(x.shape) for x in model.vision(torch.randn(2, 3, 64, 64))] == [(2, 65, 128)] * 2


# -- counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor,time_embed", [("evlm_tiny", 0), ("evlm_tiny_moe", 0), ("evlm_tiny", 4)])
def test_analytic_counts_equal_the_built_model(flavor, time_embed):
    cfg = get_config(flavor, media_token_id=MEDIA, video_time_embed=time_embed)
    counts = param_counts(cfg)
    model = EVLMModel(cfg)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    assert counts["active_params_per_token"] == model.active_params_per_token()
    for stage in ("stage1", "stage2", "stage3"):
        groups = model.trainable_parameters(stage)
        assert counts["trainable_params"][stage] == sum(p.numel() for g in groups.values() for p in g)
    assert counts["trainable_params"]["stage1_early"] == sum(p.numel() for p in groups["fusion"])


def test_evlm_14b_counts_match_meta_builds():
    cfg = get_config("evlm_14b")
    with torch.device("meta"):
        layout = {k: v for k, v in cfg.lm_layout.items() if k != "model_type"}
        lm = AutoModelForCausalLM.from_config(Qwen2Config(**layout))
        vit = TimmVision(timm.create_model(cfg.vision_name, num_classes=0), cfg.feature_layers)
        x = xattn_params(cfg)
        block = GatedXAttn(
            5120, 1792, cfg.xattn_dim, cfg.xattn_heads, build_ffn(5120, cfg.xattn_ffn_hidden, "swiglu")
        )
    assert lm_params(cfg.lm_layout) == sum(p.numel() for p in lm.parameters()) == 14_167_290_880
    assert vision_params(cfg) == sum(p.numel() for p in vit.parameters()) == 4_348_717_312
    assert x["attn"] + x["ffn"] == sum(p.numel() for p in block.parameters())
    counts = param_counts(cfg)
    assert (
        counts["total_params"] == 20_655_594_832
        and counts["trainable_params"]["stage1_early"] == 2_139_586_640
    )


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="unknown segment kind"):
        layout_row([[{"audio": "a.wav"}]], MEDIA, K)
    with pytest.raises(ValueError, match="'audio'"):
        layout_row([[{"audio": "a.wav"}]], MEDIA, K)
    model, _ = build()
    b = batch_of([[[text(1), {"image": 0}, text(2)]]])
    b["images"], b["image_slot"] = torch.randn(2, 3, 64, 64), torch.tensor([[0, 0], [0, 1]])
    b["num_slots"] = 2
    with pytest.raises(ValueError, match="row 0: 2 images but 8 media positions"):
        model(b)
    kind = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="media_slot values \\[5\\]"):
        media_intervals(kind, torch.zeros_like(kind), torch.tensor([[5, 5]]), torch.full((1, 2), -1))


def test_eve_info_prints_the_evlm_counts(capsys):
    from eve_ds.cli.info import main
    from eve_ds.models.evlm.config import get_config
    from eve_ds.models.evlm.counts import param_counts

    assert main(["evlm_14b_moe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = param_counts(get_config("evlm_14b_moe"))
    assert out["total_params"] == want["total_params"] > out["active_params_per_token"]
    assert out["trainable_params"] == want["trainable_params"] and set(out["trainable_params"]) >= {
        "stage1",
        "stage2",
        "stage3",
    }
