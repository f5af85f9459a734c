"""Checkpoint conversion: DeepSpeed checkpoints -> consolidated exports (native / Hugging Face), resharding
to another expert-parallel size, and initial weights from BEiT v2 (CLI: ``eve-convert``)."""

from eve_ds.convert.beit import import_beitv2, load_init_weights
from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.export import export, load_encoder, load_pretraining_model, read_source_config
from eve_ds.convert.reshard import reshard, resume_options

__all__ = [
    "ConvertError",
    "export",
    "import_beitv2",
    "load_encoder",
    "load_init_weights",
    "load_pretraining_model",
    "read_source_config",
    "reshard",
    "resume_options",
]
