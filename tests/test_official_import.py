"""Importing the official EVE release's checkpoints (`eve-convert import-official`) and the model options
it needs.

The official code is not in the repository (it has no licence), so the checkpoints are built here in its
key layout and shapes, and `official_forward` re-implements the official forward order (embedding norms,
x + b_m into the experts, quick GELU, no relative position bias) directly on the official state dict.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eve_ds.cli.convert import main as convert_main
from eve_ds.convert import load_init_weights
from eve_ds.convert.official import import_official
from eve_ds.convert.resolution import adapt_resolution
from eve_ds.models.config import eve_tiny
from eve_ds.models.eve import EVEModel
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.image import normalize_image

REPO = Path(__file__).resolve().parents[1]
D, LAYERS, SOFT, E, FFN, VOCAB, IMAGE, PATCH, TEXT_POS = 64, 3, (2,), 2, 96, 120, 32, 16, 196
EXPERT = "ffn.moe.deepspeed_moe.experts.deepspeed_experts"


# -- official-layout checkpoints -------------------------------------------------------------------------


class _Filler:
    """Distinct random values for every tensor (LayerNorm weights around 1), from one seeded stream."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.1, around: float = 0.0) -> torch.Tensor:
        return around + scale * torch.randn(*shape, generator=self.g)


def _ln(f: _Filler, sd: dict, key: str, n: int = D) -> None:
    sd[f"{key}.weight"], sd[f"{key}.bias"] = f(n, around=1.0), f(n)


def _lin(f: _Filler, sd: dict, key: str, n_out: int, n_in: int, bias: bool = True) -> None:
    sd[f"{key}.weight"] = f(n_out, n_in, scale=1 / math.sqrt(n_in))
    if bias:
        sd[f"{key}.bias"] = f(n_out)


def official_backbone(f: _Filler) -> dict[str, torch.Tensor]:
    """An official MultiwayTransformer state dict (names without "backbone.")."""
    n = (IMAGE // PATCH) ** 2 + 1
    sd = {"patch_embed.weight": f(D, 3, PATCH, PATCH, scale=0.05), "patch_embed.bias": f(D)}
    sd |= {
        "class_embedding_vision": f(D),
        "pos_embed_vision": f(1, n, D),
        "pos_embed_text": f(1, TEXT_POS, D),
    }
    sd |= {
        "type_embed_vision": f(D),
        "type_embed_text": f(D),
        "word_embedding.weight": f(VOCAB, D, scale=1.0),
    }
    sd |= {"position_ids_vision": torch.arange(n)[None], "position_ids_text": torch.arange(TEXT_POS)[None]}
    for name in ("layer_norm_text", "pre_layrnorm", "norm"):
        _ln(f, sd, name)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        _ln(f, sd, p + "norm1")
        _lin(f, sd, p + "attn.qkv", 3 * D, D, bias=False)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = f(D), f(D)
        _lin(f, sd, p + "attn.proj", D, D)
        sd[p + "gamma_1"], sd[p + "gamma_2"] = f(D, around=0.5), f(D, around=0.5)
        if i in SOFT:
            _ln(f, sd, p + "norm2_vl")
            sd[p + "mlp_moe.moe.gate.wg.weight"] = f(E, D, scale=0.5)
            sd[p + "mlp_moe.moe.vision_embed"], sd[p + "mlp_moe.moe.text_embed"] = (
                f(D, scale=0.5),
                f(D, scale=0.5),
            )
            for e in range(E):
                _lin(f, sd, f"{p}mlp_moe.moe.experts.experts.{e}.fc1", FFN, D)
                _lin(f, sd, f"{p}mlp_moe.moe.experts.experts.{e}.fc2", D, FFN)
        else:
            for m in ("imag", "text"):
                _ln(f, sd, f"{p}norm2_{m}")
                _lin(f, sd, f"{p}mlp_{m}.fc1", FFN, D)
                _lin(f, sd, f"{p}mlp_{m}.fc2", D, FFN)
    return sd


def official_heads(f: _Filler, task: str | None) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    if task == "vqa":
        _lin(f, sd, "output.0", 2 * D, D)
        _ln(f, sd, "output.1", 2 * D)
        _lin(f, sd, "output.3", 7, 2 * D)
    elif task == "nlvr2_concat":
        _lin(f, sd, "output.0", 2 * D, 2 * D)
        _ln(f, sd, "output.1", 2 * D)
        _lin(f, sd, "output.3", 2, 2 * D)
    elif task == "nlvr2":
        for a in ("attn1", "attn2"):
            sd[f"{a}.in_proj_weight"], sd[f"{a}.in_proj_bias"] = f(3 * D, D), f(3 * D)
            _lin(f, sd, f"{a}.out_proj", D, D)
        _lin(f, sd, "fc.0", D, 2 * D)
        _lin(f, sd, "attn_pool.fc.0", 1, D)
        _lin(f, sd, "nlvr2_output", 2, 2 * D)
    elif task == "retrieval":
        _lin(f, sd, "itc_vision_proj_head", D, D, bias=False)
        _lin(f, sd, "itc_text_proj_head", D, D, bias=False)
        sd["itc_temp"] = torch.tensor(0.05)
        _lin(f, sd, "itm_head", 2, D)
    return sd


def official_checkpoint(task: str | None = None, seed: int = 0) -> dict:
    """{'model': backbone.* + heads (+ a pre-training head the importer must ignore), 'config': {...}}."""
    f = _Filler(seed)
    model = {f"backbone.{k}": v for k, v in official_backbone(f).items()}
    model |= official_heads(f, task)
    if task is None:
        model["mlm_head.decoder.weight"] = f(VOCAB, D)  # pre-training heads: not released, ignored
    return {"model": model, "config": {"image_res": IMAGE, "batch_size_train": 8}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("official")
    out = {}
    for task in (None, "vqa", "nlvr2", "nlvr2_concat", "retrieval"):
        path = root / f"{task or 'pretrained'}.th"
        torch.save(official_checkpoint(task), path)
        out[task or "pretrained"] = path
    return out


@pytest.fixture(scope="module")
def imported(ckpts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, src in ckpts.items():
        assert convert_main(["import-official", str(src), str(root / name)]) == 0
        out[name] = root / name
    return out


# -- the official forward, re-implemented on the official state dict --------------------------------------


def _layer_norm(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _mlp(x, sd, key):
    h = _quick_gelu(F.linear(x, sd[f"{key}.fc1.weight"], sd[f"{key}.fc1.bias"]))
    return F.linear(h, sd[f"{key}.fc2.weight"], sd[f"{key}.fc2.bias"])


def _attention(x, sd, p, key_valid):
    B, N, _ = x.shape
    h = D // 64 or 1
    bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(D), sd[p + "attn.v_bias"]])
    q, k, v = F.linear(x, sd[p + "attn.qkv.weight"], bias).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    scores = (q * (D // h) ** -0.5) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])


def _moe(x, sd, p, n_image):
    """Official MoE with 2 experts, top-2: both experts, weighted by the softmax (no drop at capacity S)."""
    m = p + "mlp_moe.moe."
    b = torch.where(torch.arange(x.shape[1])[:, None] < n_image, sd[m + "vision_embed"], sd[m + "text_embed"])
    x = x + b  # router AND experts see x + b_m
    probs = F.linear(x.float(), sd[m + "gate.wg.weight"]).softmax(-1)  # (B, N, E)
    return sum(probs[..., e, None] * _mlp(x, sd, f"{m}experts.experts.{e}") for e in range(E))


def official_forward(off: dict, image=None, ids=None, mask=None, final_norm: bool = True) -> torch.Tensor:
    """Official MultiwayTransformer order -> (B, N, D) in the order [image cls; patches; text]; without
    `final_norm` the last layer's output (what the official retrieval evaluation projects)."""
    sd = {k.removeprefix("backbone."): v for k, v in off.items()}
    parts = []
    if image is not None:
        x = (
            F.conv2d(image, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=PATCH)
            .flatten(2)
            .transpose(1, 2)
        )
        x = torch.cat([sd["class_embedding_vision"].expand(x.shape[0], 1, D), x], 1)
        parts.append(x + sd["pos_embed_vision"] + sd["type_embed_vision"])
    if ids is not None:
        w = _layer_norm(F.embedding(ids, sd["word_embedding.weight"]), sd, "layer_norm_text")
        parts.append(w + sd["pos_embed_text"][:, : ids.shape[1]] + sd["type_embed_text"])
    x = _layer_norm(torch.cat(parts, 1), sd, "pre_layrnorm")
    n_image = parts[0].shape[1] if image is not None else 0
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    if ids is not None:
        valid[:, n_image:] = mask.bool()
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        x = x + sd[p + "gamma_1"] * _attention(_layer_norm(x, sd, p + "norm1"), sd, p, valid)
        if i in SOFT:
            f = _moe(_layer_norm(x, sd, p + "norm2_vl"), sd, p, n_image)
        else:
            img = _mlp(_layer_norm(x[:, :n_image], sd, p + "norm2_imag"), sd, p + "mlp_imag")
            txt = _mlp(_layer_norm(x[:, n_image:], sd, p + "norm2_text"), sd, p + "mlp_text")
            f = torch.cat([img, txt], 1)
        x = x + sd[p + "gamma_2"] * f
    return (_layer_norm(x, sd, "norm") if final_norm else x), valid


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(5, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return image, ids, mask


# -- tests -------------------------------------------------------------------------------------------------


def test_forward_equals_official_in_every_mode(ckpts, imported):
    off = torch.load(ckpts["pretrained"], weights_only=True)["model"]
    model = EVEModel.from_pretrained(imported["pretrained"])
    image, ids, mask = _inputs()
    with torch.no_grad():
        for kw in (
            {"image": image, "text_ids": ids, "text_mask": mask},
            {"image": image},
            {"text_ids": ids, "text_mask": mask},
        ):
            ref, valid = official_forward(off, kw.get("image"), kw.get("text_ids"), kw.get("text_mask"))
            out = model(**kw)
            assert out.hidden.shape == ref.shape
            diff = (out.hidden - ref).abs()[valid].max()
            assert diff < 1e-5, (list(kw), float(diff))
            assert out.n_image == ((IMAGE // PATCH) ** 2 + 1 if "image" in kw else 0)
    # without the official options the same weights give another function: the test can fail
    cfg = model.cfg
    plain = EVEModel(type(cfg)(**{**cfg.to_dict(), "ffn_act": "gelu"}))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, valid = official_forward(off, image, ids, mask)
        assert (plain.eval()(image, ids, mask).hidden - ref).abs()[valid].max() > 1e-3


def expected_encoder(off: dict) -> dict[str, torch.Tensor]:
    """The test's own statement of where every official backbone tensor must land."""
    s = {k.removeprefix("backbone."): v for k, v in off.items() if k.startswith("backbone.")}
    out = {
        "encoder.cls_token": s["class_embedding_vision"].reshape(1, 1, D),
        "encoder.pos_embed": s["pos_embed_vision"],
    }
    out |= {
        "encoder.text_pos_embed": s["pos_embed_text"],
        "encoder.word_embed.weight": s["word_embedding.weight"],
    }
    out["encoder.type_embed.weight"] = torch.stack([s["type_embed_vision"], s["type_embed_text"]])
    out |= {f"encoder.patch_embed.proj.{p}": s[f"patch_embed.{p}"] for p in ("weight", "bias")}
    for a, b in (("layer_norm_text", "text_embed_norm"), ("pre_layrnorm", "embed_norm"), ("norm", "norm")):
        out |= {f"encoder.{b}.{p}": s[f"{a}.{p}"] for p in ("weight", "bias")}
    for k, v in s.items():
        if not k.startswith("encoder.layers."):
            continue
        i, rest = k.split(".")[2], k.split(".", 3)[3]
        for a, b in (
            ("norm2_imag", "ffn.norm_image"),
            ("mlp_imag", "ffn.ffn_image"),
            ("norm2_text", "ffn.norm_text"),
            ("mlp_text", "ffn.ffn_text"),
            ("norm2_vl", "ffn.norm"),
            ("mlp_moe.moe.gate", "ffn.moe.deepspeed_moe.gate"),
            ("mlp_moe.moe.experts.experts", EXPERT),
        ):
            rest = rest.replace(a, b) if rest.startswith(a) else rest
        if "vision_embed" in rest or "text_embed" in rest:
            continue
        out[f"encoder.blocks.{i}.{rest}"] = v
    for i in SOFT:
        m = f"encoder.layers.{i}.mlp_moe.moe."
        out[f"encoder.blocks.{i}.ffn.moe.deepspeed_moe.gate.modality_bias"] = torch.stack(
            [s[m + "vision_embed"], s[m + "text_embed"]]
        )
    return out


def test_every_tensor_lands_where_it_should(ckpts, imported):
    from safetensors.torch import load_file

    off = torch.load(ckpts["pretrained"], weights_only=True)["model"]
    got = load_file(imported["pretrained"] / "model.safetensors")
    want = expected_encoder(off)
    enc = {k for k in got if k.startswith("encoder.")}
    assert enc == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # every official value is used once (none lost, none duplicated): the element counts agree, buffers aside
    n_official = sum(
        v.numel() for k, v in off.items() if k.startswith("backbone.") and "position_ids" not in k
    )
    assert sum(got[k].numel() for k in enc) == n_official


def test_inferred_config_and_report(imported):
    cfg = json.loads((imported["pretrained"] / "config.json").read_text())
    m = cfg["model"]
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["ffn_size"]) == (D, LAYERS, 1, FFN)
    assert (m["image_size"], m["patch_size"], m["vocab_size"], m["max_text_len"]) == (
        IMAGE,
        PATCH,
        VOCAB,
        TEXT_POS,
    )
    assert (m["soft_router_blocks"], m["num_experts"], m["top_k"]) == (list(SOFT), E, 2)
    assert m["text_embed_norm"] and m["embed_norm"] and m["modality_bias_to_experts"]
    assert (m["ffn_act"], m["rel_pos_bias"], m["pos_resample_antialias"], m["layer_scale_init"]) == (
        "quick_gelu",
        False,
        False,
        0.1,
    )
    assert cfg["run"]["data"]["image_mean"] == cfg["run"]["data"]["image_std"] == [0.5, 0.5, 0.5]
    rep = cfg["official"]
    assert rep["heads"] == [] and rep["ignored"] == ["mlm_head.decoder.weight"]
    assert rep["fresh"] and all(
        k.startswith("objectives.mlm.") or k.startswith("objectives.mim_pixel.") for k in rep["fresh"]
    )
    assert 'model.ffn_act="quick_gelu"' in rep["run_overrides"]
    # strict: the export loads into exactly this model, and into a PretrainingModel with its heads
    assert PretrainingModel.from_pretrained(imported["pretrained"]).obj_cfg.objectives == ["mlm", "mim_pixel"]


def _heads(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith("objectives.")}


def test_heads_are_mapped(ckpts, imported):
    def off(task):
        return torch.load(ckpts[task], weights_only=True)["model"]

    vqa, h = off("vqa"), _heads(imported["vqa"])
    for i in (0, 1, 3):
        for p in ("weight", "bias"):
            assert torch.equal(h[f"objectives.vqa.head.{i}.{p}"], vqa[f"output.{i}.{p}"])
    model = PretrainingModel.from_pretrained(imported["vqa"])
    assert model.obj_cfg.heads["vqa"]["num_answers"] == 7 and model.objectives["vqa"].head[1].eps == 1e-5
    nl, h = off("nlvr2"), _heads(imported["nlvr2"])
    pairs = {
        "attn_l2r": "attn1",
        "attn_r2l": "attn2",
        "fuse.0": "fc.0",
        "pool.score.0": "attn_pool.fc.0",
        "classifier": "nlvr2_output",
    }
    for ours, theirs in pairs.items():
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "weight", "bias"):
            if f"{theirs}.{p}" in nl:
                assert torch.equal(h[f"objectives.nlvr2.head.{ours}.{p}"], nl[f"{theirs}.{p}"]), (ours, p)
    assert PretrainingModel.from_pretrained(imported["nlvr2"]).obj_cfg.heads["nlvr2"]["head"] == "biattn"
    cc, h = off("nlvr2_concat"), _heads(imported["nlvr2_concat"])
    assert torch.equal(h["objectives.nlvr2.head.mlp.3.weight"], cc["output.3.weight"])
    rt, h = off("retrieval"), _heads(imported["retrieval"])
    assert torch.equal(h["objectives.itc.image_proj.weight"], rt["itc_vision_proj_head.weight"])
    assert torch.equal(h["objectives.itc.text_proj.weight"], rt["itc_text_proj_head.weight"])
    assert "objectives.itc.image_proj.bias" not in h and torch.equal(
        h["objectives.itm.head.weight"], rt["itm_head.weight"]
    )
    obj = PretrainingModel.from_pretrained(imported["retrieval"]).obj_cfg
    assert (obj.itc_proj_bias, obj.itc_eval_final_norm, obj.itm_rerank_score) == (False, False, "match_logit")
    assert float(h["objectives.itc.logit_scale"]) == pytest.approx(math.log(1 / 0.05))
    rep = json.loads((imported["retrieval"] / "config.json").read_text())["official"]
    assert rep["heads"] == ["retrieval"] and rep["ignored"] == [] and rep["fresh"] == []
    over = rep["run_overrides"]
    assert {"objective.itc_proj_bias=false", 'objective.itm_rerank_score="match_logit"'} <= set(over)
    assert "objective.itc_eval_final_norm=false" in over and "objective.itc_embed_dim=64" in over
    assert not any(o.startswith("task.text_preprocess") for o in over)  # only with the release's tokenizer
    assert over[0] == "model.flavor=eve_base" and not any(c.isspace() for o in over for c in o)  # shell words


def test_retrieval_heads_score_as_the_official_evaluation(ckpts, imported):
    """ITC features: normalize(W · last layer's [CLS]) without the final norm in evaluation, with it in
    training; re-ranking: itm_head(fused text [CLS])[:, 1]; no projection bias."""
    off = torch.load(ckpts["retrieval"], weights_only=True)["model"]
    model = PretrainingModel.from_pretrained(imported["retrieval"]).eval()
    itc, itm, enc = model.objectives["itc"], model.objectives["itm"], model.encoder
    assert itc.image_proj.bias is None and itc.text_proj.bias is None
    image, ids, mask = _inputs()
    with torch.no_grad():
        raw_img, _ = official_forward(off, image, final_norm=False)
        raw_txt, _ = official_forward(off, None, ids, mask, final_norm=False)
        want_img = F.normalize(F.linear(raw_img[:, 0], off["itc_vision_proj_head.weight"]), dim=-1)
        want_txt = F.normalize(F.linear(raw_txt[:, 0], off["itc_text_proj_head.weight"]), dim=-1)
        assert (itc.embed_image(enc, image)[0] - want_img).abs().max() < 1e-5
        assert (itc.embed_text(enc, ids, mask)[0] - want_txt).abs().max() < 1e-5
        itc.train()  # training's features go through the norm, as the official training's do
        normed, _ = official_forward(off, image)
        trained = F.normalize(F.linear(normed[:, 0], off["itc_vision_proj_head.weight"]), dim=-1)
        assert (itc.embed_image(enc, image)[0] - trained).abs().max() < 1e-5
        assert (trained - want_img).abs().max() > 1e-3  # the two differ: the test can fail
        fused, _ = official_forward(off, image, ids, mask)
        n_image = (IMAGE // PATCH) ** 2 + 1
        logit = F.linear(fused[:, n_image], off["itm_head.weight"], off["itm_head.bias"])[:, 1]
        assert (itm.match_score(enc, image, ids, mask) - logit).abs().max() < 1e-5


def test_retrieval_options_keep_todays_defaults():
    """Defaults: biased projections, features after the final norm, re-ranking by the log-odds."""
    from eve_ds.objectives import ObjectiveConfig as Obj

    torch.manual_seed(0)
    model = PretrainingModel(eve_tiny(), Obj(objectives=["itc", "itm"])).eval()
    itc, itm, enc = model.objectives["itc"], model.objectives["itm"], model.encoder
    image, ids, mask = torch.randn(2, 3, 64, 64), torch.randint(5, 900, (2, 7)), torch.ones(2, 7)
    with torch.no_grad():
        itc.image_proj.bias.normal_()
        itm.head.bias.normal_()
        out = enc(image=image)
        want = F.normalize(itc.image_proj(out.hidden[:, 0]), dim=-1)
        assert torch.allclose(itc.embed_image(enc, image)[0], want, atol=1e-6)
        fused = enc(image, ids, mask)
        logits = itm.head(fused.hidden[:, fused.n_image])
        assert torch.allclose(itm.match_score(enc, image, ids, mask), logits[:, 1] - logits[:, 0], atol=1e-6)
        seen = {}
        enc.norm.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
        options = Obj(objectives=["itc", "itm"], itc_eval_final_norm=False, itm_rerank_score="match_logit")
        official = PretrainingModel(eve_tiny(), options).eval()
        official.load_state_dict(model.state_dict())
        before = F.normalize(official.objectives["itc"].image_proj(enc(image=image).hidden[:, 0]), dim=-1)
        pre = F.normalize(itc.image_proj(seen["x"][:, 0]), dim=-1)  # the norm's input, from the hook
        assert torch.allclose(official.objectives["itc"].embed_image(enc, image)[0], pre, atol=1e-6)
        assert not torch.allclose(pre, before, atol=1e-3)
        score = official.objectives["itm"].match_score(enc, image, ids, mask)
        assert torch.allclose(score, logits[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match=r"objective\.itm_rerank_score"):
        Obj(itm_rerank_score="probability").validate()


def test_answer_list_and_unrepresentable_temperature(ckpts, tmp_path, capsys):
    answers = tmp_path / "answer_list.json"
    answers.write_text(json.dumps([f"a{i}" for i in range(7)]))
    dst = tmp_path / "vqa"
    assert convert_main(["import-official", str(ckpts["vqa"]), str(dst), "--answer-list", str(answers)]) == 0
    assert json.loads((dst / "config.json").read_text())["task"]["answer_vocab"]["answers"][3] == "a3"
    answers.write_text(json.dumps(["x", "y"]))
    assert (
        convert_main(
            ["import-official", str(ckpts["vqa"]), str(tmp_path / "v2"), "--answer-list", str(answers)]
        )
        == 2
    )
    assert "2 answers" in capsys.readouterr().err
    ck = official_checkpoint("retrieval")
    ck["model"]["itc_temp"] = torch.tensor(0.002)  # official clamp allows 0.001; EVE-DS's stops at 0.01
    torch.save(ck, tmp_path / "cold.th")
    rep = import_official(tmp_path / "cold.th", tmp_path / "cold")
    assert "itc_temp" in rep["not_mapped"] and "objectives.itc.logit_scale" in rep["fresh"]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.pop("backbone.encoder.layers.1.attn.proj.weight"), "layers.1.attn.proj.weight"),
        (
            lambda m: m.__setitem__("backbone.encoder.relative_position_bias_table", torch.zeros(3, 3)),
            "relative_position_bias_table",
        ),
        (lambda m: m.pop("backbone.word_embedding.weight"), "word_embedding.weight"),
        (lambda m: m.__setitem__("output.3.weight", torch.zeros(7, 5)), "output.3.weight"),
        (lambda m: m.__setitem__("backbone.pos_embed_vision", torch.zeros(1, 7, D)), "pos_embed_vision"),
    ],
)
def test_refuses_malformed(tmp_path, capsys, edit, needle):
    ck = official_checkpoint("vqa")
    edit(ck["model"])
    torch.save(ck, tmp_path / "bad.th")
    dst = tmp_path / "out"
    assert convert_main(["import-official", str(tmp_path / "bad.th"), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not dst.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_refuses_what_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "x.th").write_text("not a checkpoint")
    torch.save({"model": {"a.weight": torch.zeros(2)}}, tmp_path / "y.th")
    for name in ("x.th", "y.th", "missing.th"):
        assert convert_main(["import-official", str(tmp_path / name), str(tmp_path / "o")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bare_state_dict_and_overrides(tmp_path):
    bare = official_backbone(_Filler(0))  # official names without the prefix, no heads
    torch.save(bare, tmp_path / "bare.th")
    rep = import_official(
        tmp_path / "bare.th", tmp_path / "o", overrides=["model.max_text_len=40", "image_size=64"]
    )
    model = EVEModel.from_pretrained(tmp_path / "o")
    assert model.text_pos_embed.shape == (1, 40, D) and torch.equal(
        model.text_pos_embed[0], bare["pos_embed_text"][0, :40]
    )
    # 2x2 -> 4x4 patches, plain bicubic (the official resize)
    old = bare["pos_embed_vision"][0, 1:].reshape(1, 2, 2, D).permute(0, 3, 1, 2)
    ref = (
        F.interpolate(old, size=(4, 4), mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(16, D)
    )
    assert torch.allclose(model.pos_embed[0, 1:], ref, atol=1e-6) and rep["heads"] == []


# -- the model options, each against its formula -----------------------------------------------------------


def test_quick_gelu_in_every_ffn_and_expert():
    from eve_ds.models.moe import ModalityMoE

    x = torch.randn(10, 16)
    for impl in ("stacked", "loop"):
        torch.manual_seed(0)
        moe = ModalityMoE(16, 24, 2, 1, 2, False, 1.0, True, False, impl, ffn_act="quick_gelu").eval()
        moe.init_experts(0, seed=1, std=0.2)
        e = moe.local_experts[0]
        h = F.linear(x, e.fc1.weight, e.fc1.bias)
        assert torch.allclose(
            e(x), F.linear(h * torch.sigmoid(1.702 * h), e.fc2.weight, e.fc2.bias), atol=1e-6
        )
        if impl == "stacked":
            stacked = moe(x, torch.zeros(10, dtype=torch.long))[0]
        else:
            assert torch.allclose(moe(x, torch.zeros(10, dtype=torch.long))[0], stacked, atol=1e-6)
    enc = EVEModel(eve_tiny(ffn_act="quick_gelu"))
    assert type(enc.blocks[0].ffn.ffn_image.act).__name__ == "QuickGELU"


def test_experts_fed_x_plus_modality_bias():
    from eve_ds.models.moe import ModalityMoE

    torch.manual_seed(0)
    moe = ModalityMoE(16, 24, 2, 1, 2, False, 1.0, True, False, "loop", bias_to_experts=True).eval()
    moe.init_experts(0, seed=1, std=0.2)
    with torch.no_grad():
        moe.gate.modality_bias.normal_()
    x, modality = torch.randn(6, 16), torch.tensor([0, 0, 0, 1, 1, 1])
    xb = x + moe.gate.modality_bias[modality]
    probs = F.linear(xb, moe.gate.wg.weight).softmax(-1)  # 2 experts, top-2: both, weights = softmax
    ref = sum(probs[:, e, None] * moe.local_experts[e](xb) for e in range(2))
    with torch.no_grad():
        assert torch.allclose(moe(x, modality)[0], ref, atol=1e-5)
        assert torch.equal(moe.gate.router_logits(x, modality), F.linear(xb, moe.gate.wg.weight))


def test_embedding_norms_placement():
    cfg = eve_tiny(text_embed_norm=True, embed_norm=True, text_embed_dropout=0.1, rel_pos_bias=False)
    m = EVEModel(cfg).eval()
    with torch.no_grad():
        for ln in (m.text_embed_norm, m.embed_norm):
            ln.weight.normal_(1.0, 0.2), ln.bias.normal_()
    ids = torch.randint(0, 1000, (2, 5))
    w = m.text_embed_norm(m.word_embed(ids))
    assert torch.allclose(m.embed_text(ids), w + m.text_pos_embed[:, :5] + m.type_embed.weight[1])
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))  # returns None
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m(image, ids, torch.ones(2, 5))
    raw = torch.cat([m.embed_image(image), m.embed_text(ids)], 1)
    assert torch.allclose(seen["x"], m.embed_norm(raw), atol=1e-6)
    m.train()
    assert not torch.equal(m.embed_text(ids), m.embed_text(ids))  # dropout 0.1 in training
    # the defaults add nothing: no new parameters
    assert not any("embed_norm" in k for k in EVEModel(eve_tiny()).state_dict())


def test_image_mean_std():
    img = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    half = normalize_image(img, mean=[0.5] * 3, std=[0.5] * 3)
    assert torch.allclose(half, (img.float() / 255 - 0.5) / 0.5, atol=1e-6)
    from timm.data.constants import IMAGENET_DEFAULT_MEAN as M
    from timm.data.constants import IMAGENET_DEFAULT_STD as S

    ref = (img.float() / 255 - torch.tensor(M).view(1, 3, 1, 1)) / torch.tensor(S).view(1, 3, 1, 1)
    assert torch.allclose(normalize_image(img), ref, atol=1e-6)
    assert torch.equal(normalize_image(img), normalize_image(img, mean=list(M), std=list(S)))


@pytest.mark.parametrize("antialias", [True, False])
def test_position_table_resampling_kernel(antialias):
    table = torch.randn(1, 1 + 14 * 14, 8)
    sd = {"encoder.pos_embed": table.clone()}
    adapt_resolution(sd, {"encoder.pos_embed": torch.Size([1, 1 + 24 * 24, 8])}, antialias=antialias)
    grid = table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(24, 24), mode="bicubic", antialias=antialias, align_corners=False)
    ref = torch.cat([table[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, 8)], 1)
    assert torch.allclose(sd["encoder.pos_embed"], ref, atol=1e-5)


# -- round trips: native export, HF export, expert parallelism, tokenizer -----------------------------------


def test_export_and_hf_export_of_an_import(imported, tmp_path):
    src = imported["retrieval"]
    assert convert_main(["export", str(src), str(tmp_path / "native")]) == 0
    a, b = (
        PretrainingModel.from_pretrained(src).state_dict(),
        PretrainingModel.from_pretrained(tmp_path / "native").state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert convert_main(["export", str(src), str(tmp_path / "hf"), "--format", "hf"]) == 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    enc = EVEModel.from_pretrained(src)
    image, ids, mask = _inputs()
    with torch.no_grad():
        for kw in (
            {"image": image, "text_ids": ids, "text_mask": mask},
            {"image": image},
            {"text_ids": ids, "text_mask": mask},
        ):
            ref = enc(**kw)
            out = hf(
                pixel_values=kw.get("image"), input_ids=kw.get("text_ids"), attention_mask=kw.get("text_mask")
            )
            valid = torch.ones(ref.hidden.shape[:2], dtype=torch.bool)
            if "text_mask" in kw:
                valid[:, ref.n_image :] = mask.bool()
            assert (out.last_hidden_state - ref.hidden).abs()[valid].max() < 1e-5


def test_init_with_expert_parallelism(imported):
    """Each ep rank of an ep_size=2 model takes its own expert of the import (what eve-finetune does)."""
    cfg = json.loads((imported["pretrained"] / "config.json").read_text())
    full = PretrainingModel.from_pretrained(imported["pretrained"]).state_dict()
    from eve_ds.models.config import EVEConfig

    mcfg = EVEConfig.from_dict({**cfg["model"], "ep_size": 2})
    for rank in (0, 1):
        model = PretrainingModel(mcfg, ObjectiveConfig(**cfg["objective"]))
        report = load_init_weights(model, imported["pretrained"], ep_rank=rank)
        assert report["fresh"] == []
        own = model.state_dict()
        b = SOFT[0]
        for p in ("fc1.weight", "fc2.bias"):
            assert torch.equal(
                own[f"encoder.blocks.{b}.{EXPERT}.0.{p}"], full[f"encoder.blocks.{b}.{EXPERT}.{rank}.{p}"]
            )
        assert torch.equal(own["encoder.embed_norm.weight"], full["encoder.embed_norm.weight"])
    # a run whose model computes another function from these weights is refused, naming the option
    from eve_ds.convert import ConvertError

    plain = EVEConfig.from_dict({**cfg["model"], "ffn_act": "gelu"})
    with pytest.raises(ConvertError, match=r"model\.ffn_act='gelu'"):
        load_init_weights(
            PretrainingModel(plain, ObjectiveConfig(**cfg["objective"])), imported["pretrained"]
        )


def test_tokenizer_folder(ckpts, tmp_path):
    from transformers import BertTokenizer

    vocab = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", *(f"w{i}" for i in range(20))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    dst = tmp_path / "out"
    rep = import_official(ckpts["vqa"], dst, tokenizer=tmp_path / "tok")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model"]["pad_token_id"] == 3 and cfg["objective"]["mask_token_id"] == 4
    assert rep["tokenizer"]["first_token"] == "[CLS]" and rep["tokenizer"]["first_token_is_special"]
    assert cfg["run"]["data"]["tokenizer"] == str(dst.resolve() / "tokenizer")
    assert cfg["run"]["task"] == {"text_preprocess": "official", "name": "vqa"}
    assert rep["run_overrides"][-2:] == [
        f"data.tokenizer={dst.resolve() / 'tokenizer'}",
        "task.text_preprocess=official",
    ]
    assert all((dst / "tokenizer" / f.name).is_file() for f in (tmp_path / "tok").iterdir())
    from eve_ds.data import load_tokenizer

    assert load_tokenizer(cfg["run"]["data"]["tokenizer"]).pad_token_id == 3
    from eve_ds.infer.preprocess import hf_text_rule

    assert hf_text_rule(cfg) == {
        "kind": "question",
        "max_words": 50,
    }  # the HF config's: the release's eval rule
    big = tmp_path / "big"
    (tmp_path / "v2.txt").write_text("\n".join(vocab + [f"x{i}" for i in range(200)]) + "\n")
    BertTokenizer(str(tmp_path / "v2.txt")).save_pretrained(big)
    assert (
        convert_main(["import-official", str(ckpts["vqa"]), str(tmp_path / "o2"), "--tokenizer", str(big)])
        == 2
    )


def test_eve_info_counts_the_official_base():
    """With the two norms, EVE-Base at the official settings has the official model's 475,197,696
    parameters (counted from the instantiated official class)."""
    from eve_ds.cli.info import describe

    kw = dict(vocab_size=64000, rel_pos_bias=False, max_text_len=196, text_embed_norm=True, embed_norm=True)
    info = describe("eve_base", {**kw, "ffn_act": "quick_gelu", "modality_bias_to_experts": True})
    assert info["params_encoder"] == 475_197_696 and info["ffn_act"] == "quick_gelu"
    assert describe("eve_base", {**kw, "embed_norm": False})["params_encoder"] == 475_197_696 - 2 * 768
