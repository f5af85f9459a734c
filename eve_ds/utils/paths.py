"""Where the package finds the files it ships next to its code."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def ds_config_dir() -> Path:
    """The DeepSpeed JSON files. The repository keeps one copy, in its top-level ``ds_configs/``; a built
    wheel carries it as package data in ``eve_ds/ds_configs/`` (setup.py copies it there at build time),
    while a checkout or an editable install has only the top-level folder next to the package."""
    packaged = PACKAGE_DIR / "ds_configs"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "ds_configs"
