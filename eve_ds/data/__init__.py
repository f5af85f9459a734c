"""Image-text data: shard conversion, the synthetic corpus and the resumable training input pipeline."""

from eve_ds.data.config import CorpusConfig, DataConfig
from eve_ds.data.pipeline import build_train_loader, build_val_loader, load_tokenizer, resolve_val_spec
from eve_ds.data.synthetic import (
    ATTRIBUTE_WORDS,
    attribute_token_ids,
    ensure_synthetic_corpus,
    make_synthetic_corpus,
)
from eve_ds.data.transforms import batch_to_device, normalize_image

__all__ = [
    "ATTRIBUTE_WORDS",
    "CorpusConfig",
    "DataConfig",
    "attribute_token_ids",
    "batch_to_device",
    "build_train_loader",
    "build_val_loader",
    "ensure_synthetic_corpus",
    "load_tokenizer",
    "make_synthetic_corpus",
    "normalize_image",
    "resolve_val_spec",
]
