"""EVE model library: plain PyTorch plus DeepSpeed's MoE layer (no trainer, data, wandb or Slurm here)."""

from eve_ds.models.config import FLAVORS, EVEConfig, get_config
from eve_ds.models.eve import EncoderOutput, EVEModel

__all__ = ["FLAVORS", "EVEConfig", "EVEModel", "EncoderOutput", "get_config"]
