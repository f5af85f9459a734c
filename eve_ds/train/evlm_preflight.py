"""`eve-pretrain --dry-run` for an EVLM run: the frozen sources checked from their configs and headers (no
weight is loaded: a 14 B LM and a 4.4 B tower cost seconds, not minutes), and the resolved plan.

- `model.lm_path`: a Hugging Face folder whose `config.json` loads (`AutoConfig`, local files only) and
  matches `model.lm_layout`, with weight files, and whose tokenizer leaves `model.media_token_id` unused;
- `model.vision_path` (timm tower): a weights file (safetensors header, or a lazily mapped torch file)
  holding every tensor the pruned tower needs, in its shapes (the position table is exempt: timm resamples
  it to `model.image_size` at load);
- `train.init_from`: an EVLM run or checkpoint (a stage's start);
- `task.name=evlm_packed`: the manifest of every packed corpus names the LM's tokenizer and
  `model.num_media_tokens`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import torch

from eve_ds.data.packed_shards import fingerprint_problems, tokenizer_record
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.models.evlm.counts import param_counts
from eve_ds.train.config import RunConfig, fit_micro_batch, phase_step
from eve_ds.train.evlm_tower import eve_tower_problem
from eve_ds.utils.config import ConfigError

# The `config.json` fields of the LM that fix the model `lm_layout` describes.
LAYOUT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def lm_problems(m: EVLMConfig) -> list[str]:
    path = m.lm_path
    if not path or "$" in path:  # none: the LM is random from lm_layout; "$": reported as unset
        return []
    if not os.path.isdir(path):
        return [f"model.lm_path={path!r}: no such directory (expected a Hugging Face model folder)"]
    from transformers import AutoConfig  # the dry-run of an EVE run never needs it

    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        return [f"model.lm_path={path!r}: its config.json does not load: {first_line(e)}"]
    problems = [
        f"model.lm_layout.{k}={m.lm_layout[k]} but {path}/config.json has {getattr(hf, k, None)}"
        for k in LAYOUT_KEYS
        if k in m.lm_layout and getattr(hf, k, None) != m.lm_layout[k]
    ]
    if not glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin")):
        problems.append(f"model.lm_path={path!r}: no weight files (*.safetensors, *.bin)")
    return problems + media_token_problems(m, getattr(hf, "vocab_size", 0))


def media_token_problems(m: EVLMConfig, rows: int) -> list[str]:
    """A fixed `media_token_id` must be the tokenizer's own `media_token` or an embedding row no tokenizer
    id uses (nothing is resized)."""
    tok = os.path.join(m.lm_path, "tokenizer.json")
    if m.media_token_id < 0 or not os.path.isfile(tok):
        return []  # -1: looked up as model.media_token in the tokenizer when the model is built
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok)
    if tokenizer.token_to_id(m.media_token) == m.media_token_id < rows:
        return []  # the vocabulary has the media token, at that id (the synthetic tasks' word-level one)
    ids = tokenizer.get_vocab_size(with_added_tokens=True)
    if ids <= m.media_token_id < rows:
        return []
    return [
        f"model.media_token_id={m.media_token_id}: expected {m.media_token}'s id in the tokenizer of "
        f"{m.lm_path} or an unused embedding row, in [{ids}, {rows}) (the tokenizer has {ids} ids, the "
        f"embedding {rows} rows)"
    ]


def file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file, without reading the tensors."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def vision_problems(m: EVLMConfig) -> list[str]:
    path = m.vision_path
    if not path or "$" in path:
        return []
    if m.vision == "eve":
        problem = eve_tower_problem(m)
        return [problem] if problem else []
    if not os.path.isfile(path):
        return [f"model.vision_path={path!r}: no such file (expected timm weights of {m.vision_name})"]
    from eve_ds.models.evlm.vision import build_vision

    try:
        have = file_shapes(path)
    except Exception as e:
        return [f"model.vision_path={path!r}: not a readable weights file: {first_line(e)}"]
    with torch.device("meta"):
        tower = build_vision(dataclasses.replace(m, vision_path=""))
    need = {k.removeprefix("vit."): tuple(v.shape) for k, v in tower.state_dict().items()}
    missing = [k for k in need if k not in have]
    wrong = [k for k in need if k in have and have[k] != need[k] and k != "pos_embed"]
    if missing:
        return [
            f"model.vision_path={path!r}: lacks {len(missing)} tensor(s) of {m.vision_name}, e.g. {missing[:3]}"
        ]
    if wrong:
        k = wrong[0]
        return [
            f"model.vision_path={path!r}: {k} is {have[k]}, {m.vision_name} as configured needs {need[k]}"
        ]
    return []


def init_problems(cfg: RunConfig) -> list[str]:
    """`train.init_from` of an EVLM stage: a run directory or a tag of an EVLM run."""
    from eve_ds.train.checkpoint import latest_complete

    path = cfg.train.init_from
    if path is None or "$" in path or not os.path.exists(path):
        return []  # reported by preflight.init_problem
    tag = latest_complete(path)
    if tag is None:
        return [f"train.init_from={path!r}: no complete checkpoint in it (an EVLM run directory or a tag)"]
    family = json.loads((tag / "eve_config.json").read_text()).get("family")
    if family != "evlm":
        return [f"train.init_from={path!r}: {tag} is a checkpoint of family {family!r}, not an EVLM stage"]
    return []


def shard_problems(cfg: RunConfig) -> list[str]:
    """`evlm_packed`: every corpus's manifest names the LM's tokenizer (the sha256 of its files) and K."""
    m, d = cfg.model, cfg.data
    path = m.lm_path or d.tokenizer
    if cfg.task.name != "evlm_packed" or "$" in path or (m.lm_path and not os.path.isdir(path)):
        return []  # an unset or missing LM folder is reported by lm_problems
    specs = [(f"data.train[{c.name}].shards", c.shards) for c in d.train] + [("data.val", d.val)]
    specs = [(k, s) for k, s in specs if s and "$" not in s and os.path.exists(s)]  # others: check_corpora
    if not specs:
        return []
    try:
        own = tokenizer_record(path, load_tokenizer(path))
    except (OSError, ValueError) as e:
        return [f"{'model.lm_path' if m.lm_path else 'data.tokenizer'}={path!r}: its tokenizer does not load: "
                f"{first_line(e)}"]  # fmt: skip
    where = f"{'model.lm_path' if m.lm_path else 'data.tokenizer'}={path!r}"
    return [p for k, s in specs for p in fingerprint_problems(k, s, own, m.num_media_tokens, where)]


def evlm_problems(cfg: RunConfig) -> list[str]:
    return lm_problems(cfg.model) + vision_problems(cfg.model) + init_problems(cfg) + shard_problems(cfg)


def evlm_plan(cfg: RunConfig, world: int) -> dict:
    """What the run would do, resolved for `world` ranks, from the config alone."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    counts = param_counts(m)
    try:
        micro = fit_micro_batch(cfg, world)
    except ConfigError:
        micro = None  # reported by the layout check
    plan = {
        "flavor": cfg.model_flavor,
        "stage": m.stage,
        "lm": m.lm_path or "random, from model.lm_layout",
        "vision": f"{m.vision_name} from {m.vision_path or 'random weights'}",
        "image_tokens": (m.image_size // m.vision_patch) ** 2 + 1,
        "image_size": m.image_size,
        "total_params": counts["total_params"],
        "trainable_params": counts["trainable_params"][m.stage],
        "active_params_per_token": counts["active_params_per_token"],
        "schedule": f"{o.lr:g} -> {o.min_lr:g} ({o.schedule}), warm-up {o.warmup_steps}, {t.max_steps} steps",
        "batch": {"global": t.global_batch_size, "micro": micro, "world": world},
        "init_from": t.init_from,
    }
    if o.phase_start is not None:
        plan["phase"] = {"params": o.phase_params, "from_step": phase_step(cfg)}
        if m.stage == "stage1" and o.phase_params == ["encoder.vision.*"]:
            plan["trainable_params_before_phase"] = counts["trainable_params"]["stage1_early"]
    if m.moe:
        plan["moe"] = {"experts": m.num_experts, "top_k": m.top_k, "ep_size": m.ep_size,
                       "upcycled_from": t.init_from}  # fmt: skip
    return plan


def format_plan(plan: dict) -> list[str]:
    def fmt(v):
        return f"{v / 1e9:.3f} B" if isinstance(v, int) and v > 10**8 else v

    return ["EVLM plan:"] + [f"  {k}: {fmt(v)}" for k, v in plan.items()]
