"""The rules the README and the style guide state, checked on the source: imports only downwards (lazy ones
included) and without circles, short functions, one copy of the DeepSpeed configs, tests that import without
touching sys.path, a README that fits on a few screens and no pointers to discussions outside the code."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import eve_ds

PACKAGE = Path(eve_ds.__file__).resolve().parent
REPO = PACKAGE.parent
MAX_FUNCTION_LINES = 60
MAX_README_LINES = 200
LAYERS = (
    "utils",
    "models",
    "objectives",
    "data",
    "tasks",
    "convert",
    "infer",
    "train",
    "bench",
    "repro",
    "cli",
)
# What each layer may not import (from eve_ds); `cli` sits on top and may import everything.
FORBIDDEN = {
    "utils": set(LAYERS),
    "models": {"objectives", "data", "tasks", "convert", "infer", "train", "bench", "repro", "cli"},
    "objectives": {"data", "tasks", "convert", "infer", "train", "bench", "repro", "cli"},
    "data": {"objectives", "tasks", "convert", "infer", "train", "bench", "repro", "cli"},
    "tasks": {"convert", "infer", "train", "bench", "repro", "cli"},
    "convert": {"data", "tasks", "infer", "train", "bench", "repro", "cli"},
    "infer": {"train", "bench", "repro", "cli"},
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
    """Package data only: a wheel has no repository around it. (The one exception, the DeepSpeed configs of
    a checkout, is `eve_ds.utils.paths.ds_config_dir`.)"""
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if "parents[2]" in p.read_text() or "REPO_ROOT" in p.read_text()
    ]
    assert not offenders


def test_no_function_longer_than_60_lines():
    """Functions short enough to read at once: every def in eve_ds/, decorators and docstring included."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The eve_ds modules that importing `name` (the file `path`) imports at once: imports at module level,
    not those inside functions or under `if TYPE_CHECKING:`. `from pkg import x` counts as pkg.x when that is
    a module, else as pkg; importing pkg.x also runs pkg/__init__.py (unless pkg holds this module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                names = {f"{base}.{a.name}" for a in node.names}
                found.update(names)
                if names - modules:  # a name defined in the package itself, not a submodule
                    found.add(base)

    visit(ast.parse(path.read_text(), str(path)).body)
    parts = name.split(".")
    # The packages that hold this module are already being imported when it runs: importing a sibling
    # through them is no circle (naming one of them directly, `from eve_ds.data import x`, still counts).
    holders = {".".join(parts[:i]) for i in range(1, len(parts))}
    out = {t for t in found if t in modules}
    for target in found:
        t = target.split(".")
        out.update(".".join(t[:i]) for i in range(1, len(t)) if ".".join(t[:i]) in modules - holders)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: module_level_imports(path, name, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_circle():
    """A module's import-time dependencies form no circle: each can be read, and imported, on its own."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_circle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    (tmp_path / "m.py").write_text("import eve_ds.x\nfrom eve_ds import y\ndef f():\n    import eve_ds.z\n")
    (tmp_path / "n.py").write_text("from eve_ds.pkg import a\nfrom eve_ds.pkg.b import f\n")
    (tmp_path / "o.py").write_text("from eve_ds.pkg import a, helper\n")
    mods = {"eve_ds", "eve_ds.x", "eve_ds.y", "eve_ds.z", "eve_ds.pkg", "eve_ds.pkg.a", "eve_ds.pkg.b"}
    assert module_level_imports(tmp_path / "m.py", "eve_ds.m", mods) == {"eve_ds.x", "eve_ds.y"}
    # a sibling through the package that holds the module: no edge to the package; a named package: one
    assert module_level_imports(tmp_path / "n.py", "eve_ds.pkg.c", mods) == {"eve_ds.pkg.a", "eve_ds.pkg.b"}
    assert module_level_imports(tmp_path / "n.py", "eve_ds.other", mods) == {
        "eve_ds.pkg",
        "eve_ds.pkg.a",
        "eve_ds.pkg.b",
    }
    assert module_level_imports(tmp_path / "o.py", "eve_ds.pkg.c", mods) == {"eve_ds.pkg", "eve_ds.pkg.a"}


def test_tests_do_not_touch_sys_path():
    """Tests import eve_ds and research/ as packages (pytest's `pythonpath` in pyproject.toml)."""
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+?=|\[)")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted((REPO / "tests").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_readme_fits():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; results and experiments belong in docs/"


def test_no_pointer_to_an_issue():
    """Code and docs explain themselves: no "issue 13" that a reader cannot follow."""
    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    files = [REPO / "README.md", *sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "docs").rglob("*.md"))]
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_one_copy_of_the_deepspeed_configs():
    """The top-level ds_configs/ is the only copy in the tree, and the package finds it."""
    from eve_ds.utils.paths import ds_config_dir

    top = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
    assert top and not (PACKAGE / "ds_configs").exists()
    assert ds_config_dir() == REPO / "ds_configs"
    copies = [p for p in REPO.rglob("*.json") if p.name in top and p.parent != REPO / "ds_configs"]
    assert not [p for p in copies if ".git" not in p.parts and "build" not in p.parts], copies
