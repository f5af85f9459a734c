"""The import rules the README states, checked by parsing every module's imports (lazy ones included)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import eve_ds

PACKAGE = Path(eve_ds.__file__).resolve().parent
LAYERS = ("utils", "models", "objectives", "data", "tasks", "convert", "train", "bench", "repro", "cli")
# What each layer may not import (from eve_ds); `cli` sits on top and may import everything.
FORBIDDEN = {
    "utils": set(LAYERS),
    "models": {"objectives", "data", "tasks", "convert", "train", "bench", "repro", "cli"},
    "objectives": {"data", "tasks", "convert", "train", "bench", "repro", "cli"},
    "data": {"objectives", "tasks", "convert", "train", "bench", "repro", "cli"},
    "tasks": {"convert", "train", "bench", "repro", "cli"},
    "convert": {"data", "tasks", "train", "bench", "repro", "cli"},
    "train": {"bench", "repro", "cli"},
    "bench": {"repro", "cli"},
    "repro": {"cli"},
    "hf": set(LAYERS),  # the Hugging Face modeling file is copied into exports: standalone
}


def eve_imports(path: Path) -> set[str]:
    """The eve_ds subpackages a file imports, at any depth (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "eve_ds" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_layers_import_only_downwards():
    violations = []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = (eve_imports(path) - {layer}) & forbidden
            if bad:
                violations.append(f"{path.relative_to(PACKAGE.parent)} imports eve_ds.{sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_rule_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def load():\n    from eve_ds.convert import load_encoder\n    import eve_ds.train.trainer\n"
    )
    assert eve_imports(f) == {"convert", "train"}


def test_no_module_name_used_twice():
    """A module's file name says what it is: no two modules share one, and none is named like a
    subpackage (`data/convert.py` next to `convert/`). `config.py` is each layer's config section and
    `report.py` a layer's output writer; a `cli/` module is named after its console script (`eve-bench`:
    `cli/bench.py`), which may be the name of the library package it drives."""
    shared = ("__init__", "__main__", "config", "report")
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.stem not in shared and p.parent.name != "cli"]
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py")}
    repeated = sorted(s for s, n in Counter(stems).items() if n > 1)
    assert not repeated, f"module names used twice: {repeated}"
    assert not sorted(set(stems) & packages), "modules named like a subpackage"


def test_import_eve_ds_has_no_side_effects():
    code = (
        "import os, sys; before = dict(os.environ); import eve_ds; "
        "assert 'torch' not in sys.modules, 'import eve_ds imported torch'; "
        "assert dict(os.environ) == before, 'import eve_ds changed the environment'"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_no_file_found_through_the_repository_root():
    """Package data only: a wheel has no repository around it."""
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if "parents[2]" in p.read_text() or "REPO_ROOT" in p.read_text()
    ]
    assert not offenders
