"""Import the official EVE release's checkpoints (pre-trained or fine-tuned) as a native export.

A released checkpoint is ``{"model": state_dict, "config": dict}`` (or a bare state dict) whose encoder
keys carry the prefix ``backbone.`` (official ``MultiwayTransformer`` names) and whose task heads sit at the
top level. The layout is read from the shapes; nothing is assumed but what the weights cannot say (the
attention heads, D / 64; the activation, quick GELU; top-2 routing), and each of those can be overridden.

Encoder (official -> EVE-DS ``encoder.``)::

    patch_embed.{weight,bias}              patch_embed.proj.{weight,bias}
    class_embedding_vision (D)             cls_token (1, 1, D)
    pos_embed_vision (1 + P, D)            pos_embed (1, 1 + P, D)
    type_embed_vision, type_embed_text     type_embed.weight (2, D): row 0 image, row 1 text
    word_embedding.weight (V, D)           word_embed.weight
    pos_embed_text (T, D)                  text_pos_embed (1, T, D)
    layer_norm_text / pre_layrnorm         text_embed_norm / embed_norm (model.text_embed_norm / embed_norm)
    encoder.layers.i.{norm1, attn.*, gamma_1, gamma_2}      blocks.i.{same}
    ... norm2_imag, mlp_imag, norm2_text, mlp_text          blocks.i.ffn.{norm_image, ffn_image, norm_text, ffn_text}
    ... norm2_vl, mlp_moe.moe.gate.wg                       blocks.i.ffn.{norm, moe.deepspeed_moe.gate.wg}
    ... mlp_moe.moe.{vision,text}_embed                     blocks.i.ffn.moe.deepspeed_moe.gate.modality_bias (2, D)
    ... mlp_moe.moe.experts.experts.e.fc{1,2}               blocks.i.ffn.moe.deepspeed_moe.experts.deepspeed_experts.e.fc{1,2}
    norm                                   norm

Heads, where EVE-DS's modules compute exactly what the official ones do (``HEAD_MAPS``): VQA
``output.{0,1,3}``, NLVR2 bi-attention (``attn1/attn2``, ``fc.0``, ``attn_pool.fc.0``, ``nlvr2_output``) or
concat (``output.{0,1,3}`` on 2D inputs), retrieval ``itc_{vision,text}_proj_head`` (D -> E projections
without bias: ``objective.itc_proj_bias=false``), ``itc_temp`` and ``itm_head``, with the official
retrieval evaluation (ITC features before the final norm, re-ranking by the match logit). A head that cannot be held exactly is reported
under ``not_mapped`` and left out; keys that belong to no known part are listed under ``ignored``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.export import DTYPES, load_checked, write_native
from eve_ds.convert.resolution import adapt_resolution
from eve_ds.models.config import EVEConfig
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.config import ConfigError, parse_override
from eve_ds.utils.io import atomic_write_json, staging_dir

logger = logging.getLogger(__name__)

PREFIX = "backbone."
LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
EXPERT_RE = re.compile(r"^mlp_moe\.moe\.experts\.experts\.(\d+)\.fc1\.weight$")
BUFFERS = ("position_ids_vision", "position_ids_text")  # index buffers: EVE-DS builds positions itself
REQUIRED = ("patch_embed.weight", "class_embedding_vision", "pos_embed_vision", "word_embedding.weight")
OFFICIAL_MEAN_STD = [0.5, 0.5, 0.5]  # the official transforms' Normalize(mean, std)
OFFICIAL_HEAD_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the official heads use
EXPERT = "ffn.moe.deepspeed_moe.experts.deepspeed_experts"
# The official model options that the weights cannot show; `--set` overrides them.
OFFICIAL_DEFAULTS = dict(
    rel_pos_bias=False,
    pos_embed="learned",
    ffn_act="quick_gelu",
    top_k=2,
    drop_tokens=False,
    top2_second_expert_sampling=False,
    text_embed_dropout=0.1,
    drop_path_rate=0.1,
    pos_resample_antialias=False,
)


@dataclass
class Imported:
    """What `convert_official` made of a checkpoint: the PretrainingModel state dict (ep_size=1 names),
    its configs, and the report of what was mapped, left out and ignored."""

    state_dict: dict[str, torch.Tensor]
    model_cfg: EVEConfig
    obj_cfg: ObjectiveConfig
    heads: list[str] = field(default_factory=list)
    not_mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # head weights freshly initialised (seed 0)


# -- reading ---------------------------------------------------------------------------------------------


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A released checkpoint -> (state dict as saved, the checkpoint's own "config" dict or {})."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not a file (expected an official EVE checkpoint saved by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path}: cannot be read by torch.load ({str(e).splitlines()[0]})") from e
    extra = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        extra = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{path}: not a state dict (expected {{'model': state_dict}} or a state dict)")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ConvertError(f"{path}: not a state dict of tensors: {bad[:5]} hold no tensor")
    return obj, extra


def split_backbone(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (encoder keys without the "backbone." prefix, every other key). A bare encoder state dict (the
    official names without the prefix) is taken as it is."""
    if any(k.startswith(PREFIX) for k in sd):
        bb = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
        return bb, {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    own = {"class_embedding_vision", "pos_embed_vision", "word_embedding.weight", "pos_embed_text"}
    enc = {k for k in sd if k in own or k.split(".")[0] in ("patch_embed", "encoder", "norm", *own)}
    enc |= {k for k in sd if k.split(".")[0] in ("layer_norm_text", "pre_layrnorm", *BUFFERS)}
    enc |= {k for k in sd if k.startswith("type_embed_")}
    return {k: sd[k] for k in enc}, {k: v for k, v in sd.items() if k not in enc}


# -- layout ----------------------------------------------------------------------------------------------


def _table(t: torch.Tensor) -> torch.Tensor:
    """A position table saved as (N, D) or (1, N, D) -> (N, D)."""
    return t[0] if t.dim() == 3 and t.shape[0] == 1 else t


def _layers(bb: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in bb.items():
        if m := LAYER_RE.match(k):
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if not out or sorted(out) != list(range(len(out))):
        raise ConvertError(f"encoder.layers.i: expected blocks 0..n-1, found {sorted(out)[:8]}")
    return out


def infer_layout(bb: dict[str, torch.Tensor]) -> dict:
    """EVEConfig fields the encoder weights determine (official names, prefix removed)."""
    missing = [k for k in REQUIRED if k not in bb]
    if missing:
        raise ConvertError(f"not an official EVE checkpoint: no backbone keys {missing}")
    d = bb["class_embedding_vision"].numel()
    patch = bb["patch_embed.weight"].shape[-1]
    n_patches = _table(bb["pos_embed_vision"]).shape[0] - 1
    grid = round(math.sqrt(n_patches))
    if grid * grid != n_patches:
        raise ConvertError(f"backbone.pos_embed_vision: {n_patches} + 1 rows is not 1 + a square grid")
    layers = _layers(bb)
    soft = [i for i, p in layers.items() if "norm2_vl.weight" in p]
    experts = {sum(bool(EXPERT_RE.match(k)) for k in layers[i]) for i in soft}
    if len(experts) > 1 or 0 in experts:
        raise ConvertError(f"encoder.layers.{soft}.mlp_moe: expert counts {sorted(experts)} differ or are 0")
    fc1 = "mlp_moe.moe.experts.experts.0.fc1.weight" if soft else "mlp_imag.fc1.weight"
    first = soft[0] if soft else 0
    if fc1 not in layers[first]:
        raise ConvertError(f"no backbone.encoder.layers.{first}.{fc1} (the FFN width)")
    return dict(
        image_size=patch * grid,
        patch_size=patch,
        in_chans=bb["patch_embed.weight"].shape[1],
        vocab_size=bb["word_embedding.weight"].shape[0],
        max_text_len=_table(bb["pos_embed_text"]).shape[0] if "pos_embed_text" in bb else 196,
        num_layers=len(layers),
        hidden_size=d,
        num_heads=max(1, d // 64),
        ffn_size=layers[first][fc1].shape[0],
        qkv_bias="attn.q_bias" in layers[0],
        layer_scale_init=0.1 if "gamma_1" in layers[0] else None,
        soft_router_blocks=soft,
        num_soft_blocks=len(soft),
        num_experts=experts.pop() if experts else 2,
        modality_routing=all("mlp_moe.moe.vision_embed" in layers[i] for i in soft),
        text_embed_norm="layer_norm_text.weight" in bb,
        embed_norm="pre_layrnorm.weight" in bb,
    )


def model_config(layout: dict, model_overrides: dict, pad_token_id: int) -> EVEConfig:
    """The imported model's config: layout + the official options + `--set` overrides (which win)."""
    kw = {**OFFICIAL_DEFAULTS, **layout, "pad_token_id": pad_token_id}
    kw["modality_bias_to_experts"] = kw["modality_routing"]
    kw.update(model_overrides)
    kw["ep_size"] = 1
    try:
        return EVEConfig.from_dict(kw)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"model config: {e}") from e


# -- encoder ---------------------------------------------------------------------------------------------

BLOCK_SAME = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias")
BLOCK_OPTIONAL = (
    "attn.q_bias",
    "attn.v_bias",
    "gamma_1",
    "gamma_2",
)  # per the layout (qkv_bias, layer scale)
HARD_FFN = {"norm2_imag": "ffn.norm_image", "mlp_imag": "ffn.ffn_image"}
HARD_FFN |= {"norm2_text": "ffn.norm_text", "mlp_text": "ffn.ffn_text"}
PARAMS = ("weight", "bias")


class _Taker:
    """Reads source tensors by name and remembers which were read (the rest is reported)."""

    def __init__(self, src: dict[str, torch.Tensor]) -> None:
        self.src, self.used = src, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.src:
            raise ConvertError(f"official checkpoint: no backbone.{key}, which its layout needs")
        self.used.add(key)
        return self.src[key]

    def has(self, key: str) -> bool:
        return key in self.src


def _map_block(take: _Taker, i: int, soft: bool, out: dict[str, torch.Tensor]) -> None:
    s, d = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
    for name in BLOCK_SAME:
        out[d + name] = take(s + name)
    for name in BLOCK_OPTIONAL:
        if take.has(s + name):
            out[d + name] = take(s + name)
    if not soft:
        for a, b in HARD_FFN.items():
            for fc in (".fc1", ".fc2") if a.startswith("mlp") else ("",):
                for p in PARAMS:
                    out[f"{d}{b}{fc}.{p}"] = take(f"{s}{a}{fc}.{p}")
        return
    for p in PARAMS:
        out[f"{d}ffn.norm.{p}"] = take(f"{s}norm2_vl.{p}")
    moe = f"{s}mlp_moe.moe."
    out[f"{d}ffn.moe.deepspeed_moe.gate.wg.weight"] = take(moe + "gate.wg.weight")
    if take.has(moe + "vision_embed"):
        bias = [take(moe + "vision_embed"), take(moe + "text_embed")]  # row 0 image, row 1 text
        out[f"{d}ffn.moe.deepspeed_moe.gate.modality_bias"] = torch.stack(bias)
    e = 0
    while take.has(f"{moe}experts.experts.{e}.fc1.weight"):
        for fc in ("fc1", "fc2"):
            for p in PARAMS:
                out[f"{d}{EXPERT}.{e}.{fc}.{p}"] = take(f"{moe}experts.experts.{e}.{fc}.{p}")
        e += 1


def map_backbone(bb: dict[str, torch.Tensor], cfg: EVEConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official encoder weights (prefix removed) -> (EVE-DS "encoder." weights, backbone keys not used).
    Text positions are cut to `cfg.max_text_len` rows (an override may shorten them, never lengthen)."""
    take = _Taker(bb)
    out = {
        "encoder.patch_embed.proj.weight": take("patch_embed.weight"),
        "encoder.patch_embed.proj.bias": take("patch_embed.bias"),
        "encoder.cls_token": take("class_embedding_vision").reshape(1, 1, -1),
        "encoder.pos_embed": _table(take("pos_embed_vision"))[None],
        "encoder.word_embed.weight": take("word_embedding.weight"),
        "encoder.type_embed.weight": torch.stack([take("type_embed_vision"), take("type_embed_text")]),
    }
    text_pos = _table(take("pos_embed_text"))
    if text_pos.shape[0] < cfg.max_text_len:
        raise ConvertError(
            f"model.max_text_len={cfg.max_text_len} > the {text_pos.shape[0]} rows of backbone.pos_embed_text"
        )
    out["encoder.text_pos_embed"] = text_pos[None, : cfg.max_text_len]
    for name, ours in (
        ("layer_norm_text", "text_embed_norm"),
        ("pre_layrnorm", "embed_norm"),
        ("norm", "norm"),
    ):
        if take.has(f"{name}.weight"):
            for p in PARAMS:
                out[f"encoder.{ours}.{p}"] = take(f"{name}.{p}")
    soft = set(cfg.soft_blocks)
    for i in range(cfg.num_layers):
        _map_block(take, i, i in soft, out)
    unused = sorted(k for k in bb if k not in take.used and k not in BUFFERS)
    return out, unused


# -- heads -----------------------------------------------------------------------------------------------


@dataclass
class HeadMatch:
    """One task's official heads: the objectives that hold them, their options and their tensors."""

    task: str
    objectives: list[str]
    options: dict
    tensors: dict[str, torch.Tensor]  # PretrainingModel keys ("objectives.<name>.")
    used: list[str]
    not_mapped: dict[str, str] = field(default_factory=dict)


def _linear(heads: dict, src: str, dst: str, shape: tuple[int, int], bias: bool = True) -> dict:
    """{dst.weight, dst.bias} from src, after checking the weight's (out, in) shape."""
    w = heads[f"{src}.weight"]
    if tuple(w.shape) != shape:
        raise ConvertError(f"official head {src}.weight: shape {tuple(w.shape)}, expected {shape}")
    out = {f"{dst}.weight": w}
    if bias:
        out[f"{dst}.bias"] = heads[f"{src}.bias"]
    return out


def _mlp_head(heads: dict, dst: str, d_in: int, d: int) -> dict:
    """The official Linear(d_in, 2D) -> LayerNorm -> GELU -> Linear(2D, n) `output` head."""
    n = heads["output.3.weight"].shape[0]
    out = _linear(heads, "output.0", f"{dst}.0", (2 * d, d_in))
    out |= {f"{dst}.1.{p}": heads[f"output.1.{p}"] for p in PARAMS}
    return out | _linear(heads, "output.3", f"{dst}.3", (n, 2 * d))


def _output_head(heads: dict, d: int) -> HeadMatch | None:
    """VQA (input D) or the NLVR2 concat head (input 2D, 2 classes); both are `output.{0,1,3}`."""
    if "output.0.weight" not in heads:
        return None
    used = [f"output.{i}.{p}" for i in (0, 1, 3) for p in PARAMS]
    opts = {"head_norm_eps": OFFICIAL_HEAD_NORM_EPS}
    d_in = heads["output.0.weight"].shape[1]
    if d_in == d:
        t = _mlp_head(heads, "objectives.vqa.head", d, d)
        n = heads["output.3.weight"].shape[0]
        return HeadMatch("vqa", ["vqa"], {**opts, "vqa_num_answers": n}, t, used)
    if d_in == 2 * d and heads["output.3.weight"].shape[0] == 2:
        t = _mlp_head(heads, "objectives.nlvr2.head.mlp", 2 * d, d)
        return HeadMatch("nlvr2", ["nlvr2"], {**opts, "nlvr2_head": "concat"}, t, used)
    raise ConvertError(f"official head output.0.weight: input width {d_in} is neither D={d} nor 2D")


def _biattn_head(heads: dict, d: int) -> HeadMatch | None:
    """NLVR2's bi-attention head: attn1 (left attends to right), attn2, fc, attn_pool, nlvr2_output."""
    if "attn1.in_proj_weight" not in heads:
        return None
    h = "objectives.nlvr2.head"
    t: dict[str, torch.Tensor] = {}
    for src, dst in (("attn1", "attn_l2r"), ("attn2", "attn_r2l")):
        t |= _linear(heads, f"{src}.out_proj", f"{h}.{dst}.out_proj", (d, d))
        w, b = heads[f"{src}.in_proj_weight"], heads[f"{src}.in_proj_bias"]  # (3D, D), (3D,): q, k, v
        if tuple(w.shape) != (3 * d, d):
            raise ConvertError(
                f"official head {src}.in_proj_weight: shape {tuple(w.shape)}, expected (3D, D)"
            )
        t |= {f"{h}.{dst}.in_proj_weight": w, f"{h}.{dst}.in_proj_bias": b}
    t |= _linear(heads, "fc.0", f"{h}.fuse.0", (d, 2 * d))
    t |= _linear(heads, "attn_pool.fc.0", f"{h}.pool.score.0", (1, d))
    t |= _linear(heads, "nlvr2_output", f"{h}.classifier", (2, 2 * d))
    used = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("in_proj_weight", "in_proj_bias")]
    linears = ("attn1.out_proj", "attn2.out_proj", "fc.0", "attn_pool.fc.0", "nlvr2_output")
    used += [f"{a}.{p}" for a in linears for p in PARAMS]
    return HeadMatch("nlvr2", ["nlvr2"], {"nlvr2_head": "biattn"}, t, used)


# The official retrieval evaluation: ITC features without the final norm, re-ranking by the match logit.
OFFICIAL_RETRIEVAL = {"itc_eval_final_norm": False, "itm_rerank_score": "match_logit"}
ITC_PROJ = (("itc_vision_proj_head", "image_proj"), ("itc_text_proj_head", "text_proj"))


def _retrieval_heads(heads: dict, d: int) -> HeadMatch | None:
    """ITC projections (official: Linear(D, E) without bias, `objective.itc_proj_bias=false`), the
    temperature τ (ours: logit_scale = log(1 / τ), clamped at τ >= 0.01; a τ below cannot be held) and the
    ITM head; the options of the official evaluation (OFFICIAL_RETRIEVAL)."""
    if "itc_vision_proj_head.weight" not in heads:
        return None
    if "itc_text_proj_head.weight" not in heads:
        raise ConvertError("official retrieval heads: itc_vision_proj_head without itc_text_proj_head.weight")
    biases = {f"{src}.bias" in heads for src, _ in ITC_PROJ}
    if len(biases) > 1:
        raise ConvertError(
            "official retrieval heads: one of itc_{vision,text}_proj_head has a bias, the other not"
        )
    bias = biases.pop()
    t: dict[str, torch.Tensor] = {}
    used: list[str] = []
    e = heads["itc_vision_proj_head.weight"].shape[0]
    for src, dst in ITC_PROJ:
        t |= _linear(heads, src, f"objectives.itc.{dst}", (e, d), bias=bias)
        used += [f"{src}.{p}" for p in PARAMS if f"{src}.{p}" in heads]
    opts = {"itc_embed_dim": e, "itc_proj_bias": bias, **OFFICIAL_RETRIEVAL}
    match = HeadMatch("retrieval", ["itc"], opts, t, used)
    if "itc_temp" in heads:
        tau = float(heads["itc_temp"].reshape(-1)[0])
        if 0.01 <= tau <= 0.5:
            t["objectives.itc.logit_scale"] = torch.tensor([math.log(1 / tau)], dtype=torch.float32)
            used.append("itc_temp")
        else:
            match.not_mapped["itc_temp"] = f"τ={tau:.4g} is outside [0.01, 0.5], which EVE-DS's clamp holds"
    if "itm_head.weight" in heads:
        t |= _linear(heads, "itm_head", "objectives.itm.head", (2, d))
        used += ["itm_head.weight", "itm_head.bias"]
        match.objectives.append("itm")
    return match


HEAD_MAPS = (_output_head, _biattn_head, _retrieval_heads)


def map_heads(heads: dict[str, torch.Tensor], d: int) -> HeadMatch | None:
    """The one task whose official heads `heads` holds (None: a pre-trained checkpoint). Heads of two
    tasks in one checkpoint are refused: EVE-DS's model holds one downstream task's heads."""
    try:
        found = [m for f in HEAD_MAPS if (m := f(heads, d)) is not None]
    except KeyError as e:
        raise ConvertError(f"official checkpoint: head key {e} is missing") from e
    if len(found) > 1:
        raise ConvertError(f"official checkpoint holds heads of several tasks: {[m.task for m in found]}")
    return found[0] if found else None


# -- conversion ------------------------------------------------------------------------------------------


def split_overrides(items: list[str] | tuple[str, ...]) -> tuple[dict, dict]:
    """`--set` items -> (model overrides, objective overrides); `key=value` without a section is model."""
    model, objective = {}, {}
    for item in items:
        try:
            parts, value = parse_override(item)
        except ConfigError as e:
            raise ConvertError(str(e)) from e
        section = parts[0] if len(parts) > 1 else "model"
        if section not in ("model", "objective") or len(parts) > 2:
            raise ConvertError(f"--set {item!r}: expected model.KEY=VALUE or objective.KEY=VALUE")
        (model if section == "model" else objective)[parts[-1]] = value
    return model, objective


def tokenizer_info(path: str | Path) -> dict:
    """What the model needs from a local tokenizer folder (any `AutoTokenizer` one): its size, padding id,
    the token it puts first (the heads read the text's first output) and the mask id (MLM)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ConvertError(f"--tokenizer {path}: not a tokenizer folder ({str(e).splitlines()[0]})") from e
    if tok.pad_token_id is None:
        raise ConvertError(f"--tokenizer {path}: the tokenizer has no padding token (pad_token_id)")
    first = tok("a")["input_ids"][0]
    return {
        "path": str(Path(path).resolve()),
        "vocab_size": len(tok),
        "pad_token_id": int(tok.pad_token_id),
        "first_token_id": int(first),
        "first_token": tok.convert_ids_to_tokens(first),
        "first_token_is_special": first in tok.all_special_ids,
        "mask_token_id": tok.mask_token_id,
    }


def objective_config(match: HeadMatch | None, overrides: dict, tok: dict | None) -> ObjectiveConfig:
    """The objectives that hold the mapped heads; a pre-trained checkpoint gets the default MSM set, whose
    heads (not released) are freshly initialised."""
    kw: dict = {} if match is None else {"objectives": list(match.objectives), **match.options}
    if tok is not None and tok["mask_token_id"] is not None:
        kw["mask_token_id"] = int(tok["mask_token_id"])
    try:
        obj = ObjectiveConfig.from_dict({**kw, **overrides})
        obj.validate()
    except (TypeError, ValueError) as e:
        raise ConvertError(f"objective config: {e}") from e
    return obj


def convert_official(
    sd: dict[str, torch.Tensor], tok: dict | None = None, overrides: tuple[str, ...] = ()
) -> Imported:
    """An official state dict -> the PretrainingModel weights of the same network (strictly loaded)."""
    bb, rest = split_backbone(sd)
    model_over, obj_over = split_overrides(overrides)
    layout = infer_layout(bb)
    cfg = model_config(layout, model_over, tok["pad_token_id"] if tok else 0)
    if tok is not None and tok["vocab_size"] > cfg.vocab_size:
        raise ConvertError(
            f"--tokenizer has {tok['vocab_size']} tokens, backbone.word_embedding.weight {cfg.vocab_size} rows"
        )
    enc, unused = map_backbone(bb, cfg)
    if unused:
        raise ConvertError(f"backbone keys that EVE-DS has no place for ({len(unused)}): {unused[:5]}")
    match = map_heads(rest, cfg.hidden_size)
    obj = objective_config(match, obj_over, tok)
    torch.manual_seed(0)  # the heads that the checkpoint does not hold start the same way every time
    model = PretrainingModel(cfg, obj)
    own = model.state_dict()
    new = {**enc, **(match.tensors if match else {})}
    adapt_resolution(new, {k: v.shape for k, v in own.items()}, antialias=cfg.pos_resample_antialias)
    fresh = sorted(k for k in own if k.startswith("objectives.") and k not in new)
    load_checked(model, {**new, **{k: own[k] for k in fresh}}, "the official checkpoint")
    used = set(match.used) if match else set()
    return Imported(
        model.state_dict(),
        cfg,
        obj,
        heads=[match.task] if match else [],
        not_mapped=dict(match.not_mapped) if match else {},
        ignored=sorted(k for k in rest if k not in used),
        fresh=fresh,
    )


def read_answer_list(path: str | Path, num_answers: int) -> list[str]:
    """X-VLM's `answer_list.json` (a JSON list of answer strings, index = class) for a head of
    `num_answers` classes."""
    try:
        answers = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"--answer-list {path}: cannot be read as JSON ({e})") from e
    if isinstance(answers, dict):  # EVE-DS's own {"answers": [...]} file
        answers = answers.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ConvertError(f"--answer-list {path}: expected a JSON list of answer strings")
    if len(answers) != num_answers:
        raise ConvertError(
            f"--answer-list {path}: {len(answers)} answers, the VQA head (output.3) has {num_answers} classes"
        )
    if len(set(answers)) != len(answers):
        raise ConvertError(f"--answer-list {path}: an answer is listed twice")
    return answers


# The objective options of the mapped heads that a run must share to compute what they computed.
OBJECTIVE_RUN_KEYS = (
    "head_norm_eps",
    "itc_embed_dim",
    "itc_proj_bias",
    "itc_eval_final_norm",
    "itm_rerank_score",
)


def _word(value) -> str:
    """A value as JSON without spaces: one shell word (lists too)."""
    return json.dumps(value, separators=(",", ":"))


def run_overrides(cfg: EVEConfig, obj: ObjectiveConfig, tokenizer: str | None) -> list[str]:
    """The `key=value` items a run config needs to build this model, whatever its config's flavor:
    model.flavor=eve_base, what differs from it and the release's options (OFFICIAL_DEFAULTS, which a
    config may set otherwise, e.g. pos_embed); the image size and ep_size are the run's own choice
    (position tables are resampled, experts are sharded). Then its heads' options, and with the release's
    tokenizer its text preprocessing."""
    base = EVEConfig().to_dict()
    skip = ("image_size", "ep_size")
    keep = [k for k, v in cfg.to_dict().items() if (v != base[k] or k in OFFICIAL_DEFAULTS) and k not in skip]
    items = ["model.flavor=eve_base", *(f"model.{k}={_word(getattr(cfg, k))}" for k in keep)]
    default = ObjectiveConfig()
    items += [
        f"objective.{k}={_word(getattr(obj, k))}"
        for k in OBJECTIVE_RUN_KEYS
        if getattr(obj, k) != getattr(default, k)
    ]
    items += [f"data.image_mean={_word(OFFICIAL_MEAN_STD)}", f"data.image_std={_word(OFFICIAL_MEAN_STD)}"]
    return items + ([f"data.tokenizer={tokenizer}", "task.text_preprocess=official"] if tokenizer else [])


def export_meta(imp: Imported, src: Path, tok: dict | None, answers: list[str] | None) -> dict:
    """config.json of the import (before the tokenizer path is pointed at the export itself)."""
    task = imp.heads[0] if imp.heads else None
    data = {"image_mean": OFFICIAL_MEAN_STD, "image_std": OFFICIAL_MEAN_STD}
    if tok is not None:
        data["tokenizer"] = tok["path"]
    meta = {"model": imp.model_cfg.to_dict(), "objective": vars(imp.obj_cfg), "run": {"data": data}}
    if tok is not None:  # the release's tokenizer reads text cleaned as the release cleans it
        meta["run"]["task"] = {"text_preprocess": "official"}
    if task is not None:
        meta["run"]["task"] = {**meta["run"].get("task", {}), "name": task}
        meta["task"] = {"name": task}
        if answers is not None:
            meta["task"]["answer_vocab"] = {"answers": answers}
    meta["official"] = {
        "source": str(src),
        "heads": imp.heads,
        "not_mapped": imp.not_mapped,
        "ignored": imp.ignored,
        "fresh": imp.fresh,
        "tokenizer": tok,
    }
    return meta


def import_official(
    src: str | Path,
    dst: str | Path,
    tokenizer: str | Path | None = None,
    answer_list: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    dtype: str = "fp32",
    overwrite: bool = False,
) -> dict:
    """Official checkpoint `src` -> native export `dst` (written atomically); -> the import report
    (config.json's "official" entry, with "run_overrides": what a run config sets to build this model)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    sd, _ = read_official(src)
    tok = tokenizer_info(tokenizer) if tokenizer is not None else None
    try:
        imp = convert_official(sd, tok, tuple(overrides))
    except ConvertError:
        raise
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:  # shapes that fit no layout
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{src}: not an official EVE layout ({type(e).__name__}: {msg})") from e
    answers = None
    if answer_list is not None:
        if imp.heads != ["vqa"]:
            raise ConvertError(f"--answer-list: {src} holds no VQA head (heads: {imp.heads or 'none'})")
        answers = read_answer_list(answer_list, imp.obj_cfg.heads["vqa"]["num_answers"])
    dst = Path(dst)
    meta = export_meta(imp, Path(src), tok, answers)
    tokenizer_dir = str(dst.resolve() / "tokenizer") if tok else None
    meta["official"]["run_overrides"] = run_overrides(imp.model_cfg, imp.obj_cfg, tokenizer_dir)
    with staging_dir(dst, overwrite) as tmp:
        write_native(tmp, imp.state_dict, meta, dtype)  # copies the tokenizer from run.data.tokenizer
        if tok is not None:
            _keep_tokenizer_inside(tmp, Path(tok["path"]), dst)
    report = meta["official"]
    logger.info("imported %s -> %s: heads %s, %d keys ignored", src, dst, imp.heads, len(imp.ignored))
    return report


def _keep_tokenizer_inside(tmp: Path, tokenizer: Path, dst: Path) -> None:
    """Copy the whole tokenizer folder to `tokenizer/` of the export and point the config there, so that
    the export does not depend on the folder it was made from. A subfolder, because AutoTokenizer would
    read the export's own config.json as a model config."""
    shutil.copytree(
        tokenizer, tmp / "tokenizer", ignore=shutil.ignore_patterns("config.json", "*.safetensors")
    )
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["run"]["data"]["tokenizer"] = str(dst.resolve() / "tokenizer")
    atomic_write_json(tmp / "config.json", cfg)
