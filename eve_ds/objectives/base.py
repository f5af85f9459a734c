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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EncoderOutput, EVEModel

OBJECTIVES: dict[str, Callable[[EVEConfig, ObjectiveConfig], nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls

    return wrap


@dataclass
class ObjectiveConfig:
    """Pre-training task set and its hyper-parameters; defaults are the paper's (EVE = MLM + MIM-pixel)."""

    objectives: list[str] = field(default_factory=lambda: ["mlm", "mim_pixel"])
    text_mask_ratio: float = 0.5  # MLM: fraction of real text tokens masked
    image_mask_ratio: float = 0.75  # MIM: fraction of patches masked (25% enter the encoder)
    aux_loss_weight: float = 0.001  # α of the load-balancing loss (eq. 7)
    norm_pix_loss: bool = False  # MAE's per-patch normalised target; the paper reconstructs raw pixels
    mask_token_id: int = 103  # [MASK] in the BERT uncased vocabulary
    # Baselines for the Table 1 benchmark (ITC / ITM / MIM with visual-token targets).
    itc_embed_dim: int = 256
    itc_init_temperature: float = 0.07
    mim_token_vocab_size: int = 8192
    mim_token_mask_ratio: float = 0.4  # BEiT: 40% of the patches replaced by the mask token
    mim_token_masking: str = "block"  # block (BEiT's block-wise) | random

    def validate(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objective.objectives: unknown {unknown}; choose from {sorted(OBJECTIVES)}")
        for i, name in enumerate(self.objectives):
            for req in getattr(OBJECTIVES[name], "requires", ()):
                if req not in self.objectives[:i]:
                    raise ValueError(
                        f"objective.objectives={self.objectives}: {name} needs {req} listed "
                        f"before it (it reads {req}'s results), e.g. [..., {req}, {name}]"
                    )
        if self.mim_token_masking not in ("block", "random"):
            raise ValueError(
                f"objective.mim_token_masking={self.mim_token_masking!r}: choose block or random"
            )
        for key in ("text_mask_ratio", "image_mask_ratio", "mim_token_mask_ratio"):
            v = getattr(self, key)
            if not 0.0 < v < 1.0:
                raise ValueError(f"objective.{key}={v} must be in (0, 1)")
        if self.aux_loss_weight < 0:
            raise ValueError(f"objective.aux_loss_weight={self.aux_loss_weight} must be >= 0")


class PretrainingModel(nn.Module):
    """The shared encoder plus a set of objectives; ``forward(batch)`` -> dict of losses and metrics.

    ``loss`` = Σ objective ``*_loss`` + α · Σ (load-balancing loss of every soft-router call).
    """

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        obj_cfg.validate()
        self.model_cfg, self.obj_cfg = model_cfg, obj_cfg
        mask_token = any(getattr(OBJECTIVES[n], "uses_image_mask_token", False) for n in obj_cfg.objectives)
        self.encoder = EVEModel(model_cfg, image_mask_token=mask_token)
        self.objectives = nn.ModuleDict({n: OBJECTIVES[n](model_cfg, obj_cfg) for n in obj_cfg.objectives})

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> PretrainingModel:
        """Encoder and objective heads of a native export, a DeepSpeed checkpoint tag or a run directory,
        gathered to ep_size=1, in eval mode."""
        from eve_ds.convert import load_pretraining_model

        return load_pretraining_model(path, device)[0]

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        calls: list[EncoderOutput] = []
        batch = {**batch, "context": {}}  # per-step results shared between objectives (see `requires`)
        for obj in self.objectives.values():
            res = obj(self.encoder, batch, generator)
            calls.extend(res.pop("encoder_outputs"))
            out.update(res)
        aux = torch.stack([c.aux_loss for c in calls]).sum()
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
