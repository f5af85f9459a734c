"""The objective interface and the pre-training model that sums objectives.

An objective is an ``nn.Module`` holding its own heads; ``forward(encoder, batch, generator)`` runs the
encoder passes it needs and returns a dict: ``*_loss`` terms (summed into the total), scalar metrics, and
the encoder outputs it produced under ``"encoder_outputs"`` (their load-balancing losses and expert
counts are collected here, once per soft-router call — the encoder may run several times per step).

Objectives that depend on another one's results (ITM samples hard negatives from ITC's similarities) name
it in a class attribute ``requires`` and read what it left in ``batch["context"]``, a dict made fresh for
every step and filled in the order of ``objectives``. An objective that sets ``uses_image_mask_token``
makes the encoder own a learned image mask token (``EVEModel(image_mask_token=True)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EncoderOutput, EVEModel
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.models.weights import load_state_dict_strict, read_native_export
from eve_ds.utils.config import check

# name -> class; called as cls(model_cfg, obj_cfg, **obj_cfg.heads.get(name, {})).
OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls

    return wrap


# Saved `objective` keys of older checkpoints -> (objective, its head's constructor option).
ITM_RERANK_SCORES = ("log_odds", "match_logit")  # objective.itm_rerank_score
LEGACY_HEAD_KEYS = {"vqa_num_answers": ("vqa", "num_answers"), "nlvr2_head": ("nlvr2", "head")}


def upgrade_saved_objective(d: dict) -> dict:
    """A saved `objective` section with the former flat head keys moved into `heads` (for the objectives
    it trains; the others' values were unused defaults)."""
    d = dict(d)
    heads = {k: dict(v) for k, v in (d.pop("heads", None) or {}).items()}
    for key, (objective, option) in LEGACY_HEAD_KEYS.items():
        if key in d:
            value = d.pop(key)
            if objective in d.get("objectives", ()):  # the default set trains neither
                heads.setdefault(objective, {}).setdefault(option, value)
    return {**d, "heads": heads}


@dataclass
class ObjectiveConfig:
    """Pre-training task set and its hyper-parameters ([paper]: EVE Sec. 3-4; [ours]: this project's)."""

    objectives: list[str] = field(default_factory=lambda: ["mlm", "mim_pixel"])  # [paper] MSM
    text_mask_ratio: float = 0.5  # [paper] MLM: fraction of real text tokens masked
    image_mask_ratio: float = 0.75  # [paper] MIM: fraction of patches masked (25% enter the encoder)
    aux_loss_weight: float = 0.001  # [paper] α of the load-balancing loss (eq. 7)
    # How the load-balancing losses of one step are combined before α: "mean" over every soft-router call
    # (each soft block in each encoder pass) as the official EVE code does, or "sum" (the effective α is
    # then multiplied by blocks x passes: 4 for Base MSM, 6 for Large). The paper does not say.
    aux_loss_reduction: str = "mean"  # [official code]
    norm_pix_loss: bool = False  # [paper] raw pixels (MAE's per-patch normalised target when true)
    mask_token_id: int = 103  # [MASK] in the BERT uncased vocabulary
    # Baselines for the Table 1 benchmark (ITC / ITM / MIM with visual-token targets).
    itc_embed_dim: int = 256
    itc_init_temperature: float = 0.07
    # The ITC projections Linear(D, itc_embed_dim): with a bias [ours] | without (false) [official code].
    itc_proj_bias: bool = True
    # Evaluation's ITC features from the encoder output after the final norm [ours] | from the last block's
    # output before it (false) [official code: its evaluation skips the norm that its training applies].
    itc_eval_final_norm: bool = True
    # Retrieval re-ranks a row's ITC top k by: log_odds [ours] logit[match] - logit[no match] of the ITM
    # head | match_logit [official code] logit[match] alone.
    itm_rerank_score: str = "log_odds"
    # Where ITM draws its hard negatives: local (this rank's micro-batch) [ours] | global (the batch of every
    # data-parallel rank, same image id masked) [official code, as ALBEF].
    itm_negatives: str = "local"
    mim_token_vocab_size: int = 8192
    mim_token_mask_ratio: float = 0.4  # BEiT: 40% of the patches replaced by the mask token
    mim_token_masking: str = "block"  # block (BEiT's block-wise) | random
    # Table 5 †: MLM and MIM from ONE pass (`msm_joint`), text_mask_ratio of the text and this fraction of
    # the patches masked (dropped) together.
    joint_image_mask_ratio: float = 0.5  # [paper]
    # Constructor options of the objectives' heads, by objective name, that a task's data decides (e.g.
    # {"vqa": {"num_answers": 3129}}): derived by `train.config.resolve` from `Task.objective_options`.
    heads: dict[str, dict] = field(default_factory=dict)
    # LayerNorm ε of the VQA and NLVR2-concat heads; None = model.norm_eps. The official release's heads use
    # PyTorch's default 1e-5 (set by `eve-convert import-official` when it maps them).
    head_norm_eps: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ObjectiveConfig:
        """From a saved config's `objective` section, also one written before the head options moved
        into `heads` (flat `vqa_num_answers` / `nlvr2_head` keys)."""
        return cls(**upgrade_saved_objective(d))

    def validate(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        check(
            bool(self.objectives) and not unknown,
            "objective.objectives",
            self.objectives,
            f"a non-empty list of {sorted(OBJECTIVES)} (unknown {unknown})",
        )
        for i, name in enumerate(self.objectives):
            for req in getattr(OBJECTIVES[name], "requires", ()):
                check(
                    req in self.objectives[:i],
                    "objective.objectives",
                    self.objectives,
                    f"{req} listed before {name} (it reads {req}'s results), e.g. [..., {req}, {name}]",
                )
        check(
            self.mim_token_masking in ("block", "random"),
            "objective.mim_token_masking",
            self.mim_token_masking,
            "block or random",
        )
        for key in ("text_mask_ratio", "image_mask_ratio", "mim_token_mask_ratio", "joint_image_mask_ratio"):
            check(0.0 < getattr(self, key) < 1.0, f"objective.{key}", getattr(self, key), "in (0, 1)")
        check(self.aux_loss_weight >= 0, "objective.aux_loss_weight", self.aux_loss_weight, ">= 0")
        check(
            self.aux_loss_reduction in ("mean", "sum"),
            "objective.aux_loss_reduction",
            self.aux_loss_reduction,
            "mean or sum",
        )
        check(
            self.itm_negatives in ("local", "global"),
            "objective.itm_negatives",
            self.itm_negatives,
            "local or global",
        )
        check(
            self.itm_rerank_score in ITM_RERANK_SCORES,
            "objective.itm_rerank_score",
            self.itm_rerank_score,
            f"one of {list(ITM_RERANK_SCORES)}",
        )
        extra = sorted(set(self.heads) - set(self.objectives))
        check(not extra, "objective.heads", self.heads, f"options of listed objectives only (not {extra})")


class PretrainingModel(nn.Module):
    """The shared encoder plus a set of objectives; ``forward(batch)`` -> dict of losses and metrics.

    ``loss`` = Σ objective ``*_loss`` + α · (mean or sum of the load-balancing losses of every soft-router
    call, `aux_loss_reduction`).
    """

    def __init__(
        self, model_cfg: EVEConfig | EVLMConfig, obj_cfg: ObjectiveConfig, backbone: nn.Module | None = None
    ) -> None:
        """`backbone`: the model the objectives run, kept as `encoder` (default: an `EVEModel` of
        `model_cfg`; another model family passes its own, e.g. an `EVLMModel`, whose output has the same
        `aux_loss` / `expert_counts` fields)."""
        super().__init__()
        obj_cfg.validate()
        self.model_cfg, self.obj_cfg = model_cfg, obj_cfg
        if backbone is None:
            mask_token = any(
                getattr(OBJECTIVES[n], "uses_image_mask_token", False) for n in obj_cfg.objectives
            )
            backbone = EVEModel(model_cfg, image_mask_token=mask_token)
        self.encoder = backbone
        self.objectives = nn.ModuleDict(
            {n: OBJECTIVES[n](model_cfg, obj_cfg, **obj_cfg.heads.get(n, {})) for n in obj_cfg.objectives}
        )

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> PretrainingModel:
        """Encoder and objective heads of a native export (`eve-convert export`), ep_size=1, in eval mode.
        DeepSpeed checkpoints and run directories: `eve_ds.convert.load_pretraining_model`."""
        sd, cfg = read_native_export(path)
        model_cfg = EVEConfig.from_dict({k: v for k, v in cfg["model"].items() if k != "flavor"})
        model = cls(
            dataclasses.replace(model_cfg, ep_size=1), ObjectiveConfig.from_dict(cfg.get("objective", {}))
        )
        load_state_dict_strict(model, sd, str(path))
        return model.to(device).eval()

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        calls: list[EncoderOutput] = []
        batch = {**batch, "context": {}}  # per-step results shared between objectives (see `requires`)
        for obj in self.objectives.values():
            res = obj(self.encoder, batch, generator)
            calls.extend(res.pop("encoder_outputs"))
            out.update(res)
        aux = torch.stack([c.aux_loss for c in calls]).sum()
        if self.obj_cfg.aux_loss_reduction == "mean":
            aux = aux / max(1, sum(len(c.expert_counts) for c in calls))  # one term per soft-router call
        out["aux_loss"] = self.obj_cfg.aux_loss_weight * aux
        out["loss"] = sum(v for k, v in out.items() if k.endswith("_loss"))
        counts: dict[int, Tensor] = {}
        for c in calls:
            for block, n in c.expert_counts.items():
                counts[block] = counts[block] + n if block in counts else n
        for block, n in counts.items():
            out[f"expert_load/block{block}"] = n / n.sum(1, keepdim=True).clamp(min=1)  # (2, E)
        return out

    def init_experts(self, ep_rank: int) -> None:
        self.encoder.init_experts(ep_rank)
