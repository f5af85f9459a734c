"""The tokenizer files every export carries, so that an export is usable without the run that made it."""

from __future__ import annotations

import shutil
from pathlib import Path

from eve_ds.convert.ds_checkpoint import ConvertError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# WordPiece (vocab.txt), BPE (vocab.json + merges.txt) and sentencepiece folders, and their HF configs.
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)


def tokenizer_source(cfg: dict) -> Path:
    """The run's tokenizer folder: a packaged name (eve_ds/assets/<name>) or a local path."""
    name = ((cfg.get("run") or {}).get("data") or {}).get("tokenizer") or "bert-base-uncased"
    for p in (ASSETS / name, Path(name).expanduser()):
        if p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES):
            return p
    raise ConvertError(f"tokenizer {name!r} of the run config: neither {ASSETS / name} nor a local folder")


def copy_tokenizer(cfg: dict, dst: Path) -> list[str]:
    """Copy the run's tokenizer files into `dst`; -> the names copied."""
    src = tokenizer_source(cfg)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
