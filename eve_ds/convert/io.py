"""Output directories that appear whole or not at all, and the tokenizer files that go with a model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from eve_ds.convert.checkpoint import ConvertError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


@contextlib.contextmanager
def staging_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `dst`; rename it to `dst` when the block succeeds, delete it
    when it raises. A reader never sees a half-written `dst`."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def tokenizer_source(cfg: dict) -> Path:
    """The run's tokenizer folder: a packaged name (eve_ds/assets/<name>) or a local path."""
    name = ((cfg.get("run") or {}).get("data") or {}).get("tokenizer") or "bert-base-uncased"
    for p in (ASSETS / name, Path(name).expanduser()):
        if p.is_dir() and (p / "vocab.txt").is_file():
            return p
    raise ConvertError(f"tokenizer {name!r} of the run config: neither {ASSETS / name} nor a local folder")


def copy_tokenizer(cfg: dict, dst: Path) -> list[str]:
    src = tokenizer_source(cfg)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
