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

from eve_ds.cli.convert_ckpt import main as convert_main
from eve_ds.convert import export, load_init_weights
from eve_ds.convert.official import import_official
from eve_ds.convert.resolution import adapt_resolution
from eve_ds.models.config import eve_tiny
from eve_ds.models.eve import EVEModel
from eve_ds.models.moe import ModalityMoE
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


def official_forward(off: dict, image=None, ids=None, mask=None) -> torch.Tensor:
    """Official MultiwayTransformer order -> (B, N, D) in the order [image cls; patches; text]."""
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
    return _layer_norm(x, sd, "norm"), valid


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
