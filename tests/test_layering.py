"""The import rules the README states, checked by parsing every module's imports (lazy ones included)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import eve_ds

PACKAGE = Path(eve_ds.__file__).resolve().parent
LAYERS = ("utils", "models", "objectives", "data", "tasks", "convert", "train", "bench", "cli")
# What each layer may not import (from eve_ds); `cli` sits on top and may import everything.
FORBIDDEN = {
    "utils": set(LAYERS),
    "models": {"objectives", "data", "tasks", "convert", "train", "bench", "cli"},
    "objectives": {"data", "tasks", "convert", "train", "bench", "cli"},
    "data": {"objectives", "tasks", "convert", "train", "bench", "cli"},
    "tasks": {"convert", "train", "bench", "cli"},
    "convert": {"data", "tasks", "train", "bench", "cli"},
    "train": {"bench", "cli"},
    "bench": {"cli"},
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


EXEMPT_NAMES = ("__init__", "__main__", "config")  # `config.py`: each layer's (or task's) config section


def naming_problems(package: Path) -> list[str]:
    """Where a module's name is ambiguous. Names are read qualified by their package, so a name may repeat
    in different layers (`objectives/base.py`, `tasks/base.py`) but not where it would be mistaken:

    1. no module is named like a subpackage beside it (`x.py` next to `x/`: an import finds only one);
    2. no module at the top of a layer is named like another layer (`data/convert.py` reads as part of
       `convert/`), except in `cli/`, whose files are named after their commands. One level down, the
       subpackage qualifies the name: `tasks/vqa/data.py` is VQA's data;
    3. within one layer a name is used once, except for one role in each of sibling subpackages (every
       task subpackage has `data`, `eval`, `synthetic` and `task`: `tasks/vqa/task.py`, `tasks/nlvr2/task.py`).
    """
    modules = sorted(p for p in package.rglob("*.py") if p.stem not in EXEMPT_NAMES)
    layers = {p.parent.name for p in package.glob("*/__init__.py")}
    problems = []
    for p in modules:
        rel = p.relative_to(package)
        if (p.parent / p.stem / "__init__.py").exists():
            problems.append(f"{rel} is named like the subpackage beside it")
        if len(rel.parts) == 2 and rel.parts[0] != "cli" and p.stem in layers - {rel.parts[0]}:
            problems.append(f"{rel} is named like the layer {p.stem}/")
    by_layer_and_name: dict[tuple[str, str], list[Path]] = {}
    for p in modules:
        rel = p.relative_to(package)
        if len(rel.parts) > 1:
            by_layer_and_name.setdefault((rel.parts[0], p.stem), []).append(rel)
    for (_, name), paths in sorted(by_layer_and_name.items()):
        siblings = len({r.parent.parent for r in paths}) == 1 and all(len(r.parts) > 2 for r in paths)
        if len(paths) > 1 and not siblings:
            problems.append(f"{name}.py is used twice in one layer: {sorted(map(str, paths))}")
    return problems


def test_module_names_are_unambiguous():
    problems = naming_problems(PACKAGE)
    assert not problems, "\n".join(problems)


def test_naming_rules_catch_each_case(tmp_path):
    for path in (
        "data/convert.py",  # rule 2
        "convert/__init__.py",
        "cli/convert.py",  # a command: allowed
        "tasks/vqa/__init__.py",
        "tasks/vqa/task.py",
        "tasks/nlvr2/__init__.py",
        "tasks/nlvr2/task.py",  # rule 3: a sibling's role, allowed
        "tasks/nlvr2/data.py",  # one level down: allowed
        "tasks/task.py",  # rule 3: not a sibling of the subpackages' task.py
        "tasks/__init__.py",
        "train/shards.py",  # rule 1
        "train/shards/__init__.py",
        "train/__init__.py",
        "data/__init__.py",
        "cli/__init__.py",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert naming_problems(tmp_path) == [
        "data/convert.py is named like the layer convert/",
        "train/shards.py is named like the subpackage beside it",
        "task.py is used twice in one layer: ['tasks/nlvr2/task.py', 'tasks/task.py', 'tasks/vqa/task.py']",
    ]


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
