"""Model families: the one module that knows how a run's model and objectives are built, initialised and
described in a checkpoint. The trainer holds one family object and calls only the methods below, so a
second family (a different backbone with its own config class and flavors) plugs in by registering a
`ModelFamily` here, without a change to the trainer (docs/extending.md, "Adding a model family").

A run's family follows from its model flavor (`model.flavor`, e.g. `eve_tiny`): each family lists its
flavors, so saved configs need no key of their own and mean what they meant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from eve_ds.convert import load_init_weights
from eve_ds.models.config import FLAVORS
from eve_ds.models.evlm.config import FLAVORS as EVLM_FLAVORS
from eve_ds.models.evlm.counts import param_counts
from eve_ds.objectives import PretrainingModel
from eve_ds.objectives.flops import TextShape, flops_per_pair
from eve_ds.train.checkpoint import latest_complete, missing_trainable_problem
from eve_ds.train.config import ConfigError, RunConfig
from eve_ds.train.evlm_tower import load_eve_tower, tower_change_problem, tower_source
from eve_ds.train.preflight import EVLM_NEEDS_PACKED

logger = logging.getLogger(__name__)


class ModelFamily:
    """What the trainer needs from a model family. Subclasses set `name` and `flavors` and implement the
    methods that raise."""

    name: str = ""
    flavors: tuple[str, ...] = ()
    # Extra arguments of DeepSpeed's `engine.save_checkpoint` (e.g. leaving out frozen parameters).
    save_kwargs: MappingProxyType = MappingProxyType({})
    # Extra arguments of `engine.load_checkpoint` when a run resumes (e.g. accepting the left-out ones).
    load_kwargs: MappingProxyType = MappingProxyType({})

    def build_model(self, cfg: RunConfig) -> nn.Module:
        """The backbone with the run's objectives (forward(batch, generator) -> dict with `loss`), before
        any weight is loaded. Called after `torch.manual_seed(train.seed)` on every rank."""
        raise NotImplementedError

    def init_weights(self, model: nn.Module, cfg: RunConfig, ep_rank: int, resuming: bool) -> None:
        """Make the weights final before `deepspeed.initialize` (ZeRO copies them into its fp32
        partitions): this rank's experts, and `train.init_from` unless a checkpoint is resumed."""
        raise NotImplementedError

    def checkpoint_config(self, cfg: RunConfig, model: nn.Module | None = None) -> dict:
        """What a checkpoint's `eve_config.json` records to rebuild the model without the trainer
        (`model`: the model being saved, for what only it knows)."""
        raise NotImplementedError

    def batch_shape(self, batch: dict):
        """What the FLOP count of a micro-batch depends on (read before the batch moves to the device)."""
        raise NotImplementedError

    def flops_per_sample(self, cfg: RunConfig, shape) -> float:
        """Training FLOPs of one sample of a batch of `shape` (for the MFU)."""
        raise NotImplementedError

    def check_resume(self, module: nn.Module, tag: Path) -> None:
        """Raise when checkpoint `tag` cannot resume `module` (before it is loaded). Default: nothing."""


class EVEFamily(ModelFamily):
    """EVE: one shared encoder with modality-aware MoE (`models/eve.py`) under `PretrainingModel`."""

    name = "eve"
    flavors = tuple(FLAVORS)

    def build_model(self, cfg: RunConfig) -> PretrainingModel:
        model = PretrainingModel(cfg.model, cfg.objective)
        model.encoder.grad_checkpointing = cfg.train.grad_checkpointing
        return model

    def init_weights(self, model: PretrainingModel, cfg: RunConfig, ep_rank: int, resuming: bool) -> None:
        model.init_experts(ep_rank)
        if cfg.train.init_from and not resuming:
            report = load_init_weights(model, cfg.train.init_from, ep_rank=ep_rank)
            logger.info("initialised from %s: %s", cfg.train.init_from, report)

    def checkpoint_config(self, cfg: RunConfig, model: nn.Module | None = None) -> dict:
        return {
            "family": self.name,
            "model": cfg.model.to_dict(),
            "objective": asdict(cfg.objective),
            "run": cfg.to_dict(),
        }

    def batch_shape(self, batch: dict) -> TextShape:
        # Real tokens per caption and the batch's padded length (its longest text).
        return TextShape(
            padded=int(batch["text_ids"].shape[1]),
            real=round(float(batch["text_mask"].sum(1).float().mean())),
        )

    def flops_per_sample(self, cfg: RunConfig, shape: TextShape) -> float:
        return flops_per_pair(cfg.model, cfg.objective, shape, cfg.train.micro_batch_size)


class EVLMFamily(ModelFamily):
    """EVLM: a frozen causal LM reading a ViT through gated cross-attention (`models/evlm/`), trained with
    `caption_lm`. Only the stage's trainable parameters are checkpointed: the frozen LM and tower are
    rebuilt from their files (or, without files, from `train.seed`, as the first run built them)."""

    name = "evlm"
    flavors = tuple(EVLM_FLAVORS)
    save_kwargs = MappingProxyType({"exclude_frozen_parameters": True})
    # The left-out frozen weights are absent from the module file; the model already holds them.
    load_kwargs = MappingProxyType({"load_module_strict": False})

    def build_model(self, cfg: RunConfig) -> PretrainingModel:
        from eve_ds.models.evlm.model import EVLMModel  # transformers: only for runs of this family

        if cfg.task.name == "msm":
            raise ConfigError(EVLM_NEEDS_PACKED)
        # freezes all but the trainable set of model.stage; an EVE tower read from its run
        backbone = EVLMModel(cfg.model, tower=load_eve_tower(cfg.model))
        backbone.set_grad_checkpointing(cfg.train.grad_checkpointing)
        return PretrainingModel(cfg.model, cfg.objective, backbone=backbone)

    def init_weights(self, model: PretrainingModel, cfg: RunConfig, ep_rank: int, resuming: bool) -> None:
        """`train.init_from` = the run (or tag) of the stage this one continues: every weight its
        checkpoint holds (what that stage trained, a superset of what this one trains) over the weights
        built from the files; into an `evlm_*_moe` model through `upcycle_from`. Also when resuming: what
        the earlier stage trained and this one freezes is in no checkpoint of this run. Routed experts are
        first drawn per global expert, so a MoE from scratch is the same model for any ep_size."""
        model.encoder.init_experts(ep_rank)
        if cfg.train.init_from:
            stage_init(model.encoder, cfg.train.init_from, ep_rank)

    def checkpoint_config(self, cfg: RunConfig, model: nn.Module | None = None) -> dict:
        m = cfg.model
        tower = tower_source(model.encoder) if model is not None else None
        return {
            "family": self.name,
            "model": m.to_dict(),
            "objective": asdict(cfg.objective),
            "run": cfg.to_dict(),
            # The frozen weights are not in the checkpoint: say where they come from, and which version (an
            # EVE tower: the checkpoint read and the sha256 of its weights).
            "sources": {"lm": source_record(m.lm_path), "vision": tower or source_record(m.vision_path)},
        }

    def check_resume(self, module: nn.Module, tag: Path) -> None:
        """The module file leaves out the frozen weights and is loaded non-strictly: what it lacks must be
        exactly what the model freezes (a trainable key missing is one error naming it); an EVE tower must
        be the one the run started from (its frozen blocks are in no checkpoint)."""
        problem = missing_trainable_problem(module, tag)
        if problem is None and (tag / "eve_config.json").is_file():
            saved = (json.loads((tag / "eve_config.json").read_text()).get("sources") or {}).get("vision")
            problem = tower_change_problem(saved, tower_source(module.encoder))
        if problem:
            raise ConfigError(problem)

    def batch_shape(self, batch: dict) -> tuple[int, int]:
        """(row length S, images per row): what the LM and the tower each process per sample."""
        rows = batch["input_ids"].shape[0]
        return int(batch["input_ids"].shape[1]), batch["image"].shape[0] // max(1, rows)

    def flops_per_sample(self, cfg: RunConfig, shape: tuple[int, int]) -> float:
        """2 FLOPs per parameter and token forward, x 3 for training (the frozen parts' backward still
        computes activation gradients, only their weight gradients are saved: an over-count of < 1/3
        there). Cross-attention scores are left out: at the tiny and 224 px scales they are small."""
        seq, images = shape
        parts = param_counts(cfg.model)["parts"]
        tokens_per_image = (cfg.model.image_size // cfg.model.vision_patch) ** 2 + 1
        return 6.0 * ((parts["lm"] + parts["xattn"]) * seq + parts["vision"] * tokens_per_image * images)


def stage_init(backbone: nn.Module, path: str, ep_rank: int) -> None:
    """Load an earlier EVLM stage's checkpoint (its module file: the trainable weights of that stage) into
    `backbone`; a dense checkpoint into a MoE model is upcycled (`EVLMModel.upcycle_from`)."""
    tag = latest_complete(Path(path))
    if tag is None:
        raise ConfigError(
            f"train.init_from={path!r}: no complete checkpoint (an EVLM run directory or a tag)"
        )
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    sd = {k.removeprefix("encoder."): v for k, v in module.items() if k.startswith("encoder.")}
    dense = not any(".xattn.ffn.world." in k for k in sd)  # a MoE checkpoint has the world expert
    if backbone.cfg.moe and dense:
        own = {k: v for k, v in backbone.state_dict().items() if ".xattn.ffn." not in k}
        backbone.upcycle_from({**own, **sd}, ep_rank)
        logger.info("initialised from %s: %d tensors, cross-attention FFNs upcycled", tag, len(sd))
        return
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    untouched = [n for n, p in backbone.named_parameters() if p.requires_grad and n in missing]
    if unexpected or untouched:
        raise ConfigError(
            f"train.init_from={path!r}: {tag} does not fit model.flavor: unexpected {unexpected[:3]}, "
            f"trainable but absent {untouched[:3]}"
        )
    logger.info("initialised from %s: %d tensors", tag, len(sd))


def source_record(path: str) -> dict | None:
    """A frozen part's source: its path and the sha256 of its `config.json` (a directory) or of the file
    itself when it is a small one (a weights file is not hashed: gigabytes at every save)."""
    if not path:
        return None
    config = os.path.join(path, "config.json") if os.path.isdir(path) else None
    digest = None
    if config and os.path.isfile(config):
        with open(config, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(path), "config_sha256": digest}


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its flavors must not already belong to another one."""
    taken = {f: other.name for other in FAMILIES.values() for f in other.flavors if other.name != family.name}
    clash = sorted(set(family.flavors) & set(taken))
    if clash:
        raise ValueError(f"family {family.name!r}: flavors {clash} already belong to {taken[clash[0]]!r}")
    FAMILIES[family.name] = family
    return family


register_family(EVEFamily())
register_family(EVLMFamily())


def family_of(cfg: RunConfig) -> ModelFamily:
    """The family whose flavors include the run's `model.flavor`."""
    for family in FAMILIES.values():
        if cfg.model_flavor in family.flavors:
            return family
    raise ValueError(
        f"model.flavor={cfg.model_flavor!r}: no model family has it (families: {sorted(FAMILIES)})"
    )
