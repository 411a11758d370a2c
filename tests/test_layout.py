"""The package layout shows the path: one subpackage per stage, imports pointing to earlier stages only.

Every ``florence_kit`` import is counted, also those inside functions (they are imports all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "florence_kit"
STAGES = ("common", "metrics", "tasks", "data", "model", "evaluate", "train", "present", "demo", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The florence_kit modules ``path`` imports (``from pkg import module`` resolved to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("florence_kit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("florence_kit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return {m for m in found if m in known}


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else -1


def test_every_module_lives_in_a_stage_subpackage():
    loose = [m for m in modules() if stage(m) < 0 and m != "florence_kit"]
    assert loose == [], f"modules outside the stage subpackages: {loose}"


def test_subpackages_say_what_lives_there():
    for name in STAGES:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 12, f"{init} should open with two or three lines on what lives there"


def test_imports_point_to_earlier_stages_only():
    mods = modules()
    upward = [
        f"{m} -> {dep}"
        for m, path in mods.items()
        for dep in imports_of(path, set(mods))
        if stage(dep) > stage(m)
    ]
    assert upward == []


def test_training_config_reaches_earlier_stages_only_as_typed_views():
    """train/'s TrainConfig is what the package calls ``cfg``; a ``cfg`` parameter in an earlier stage would carry
    it as ``Any``, a dependency on train/ that the import check above cannot see. Earlier stages define what they
    read instead (model/memory.FitRequest, model/adapters.AdapterOptions), and train/ fills it."""
    later = STAGES.index("train")
    found = [
        f"{m}.{node.name}"
        for m, path in modules().items() if 0 <= stage(m) < later
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and "cfg" in {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
    ]
    assert found == []


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    # a package __init__ importing its own modules (metrics registering built-ins) is not a cycle of two modules
    graph = {m: {d for d in deps if d.rsplit(".", 1)[0] != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("name", ["florence_kit.metrics"])
def test_public_import_paths_stay(name):
    import importlib

    mod = importlib.import_module(name)
    assert callable(mod.metric) and callable(mod.get_metric)


def layout_map() -> dict[str, str]:
    """docs/development.md's map of the package: each subpackage's entry (its line and the lines under it)."""
    text = (PACKAGE.parent / "docs" / "development.md").read_text()
    block = text.split("## The layout of the package", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = line[2:].split("/", 1)[0] if line.startswith("  ") and not line.startswith("   ") else None
        if head in STAGES:
            current = head
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_the_layout_map_names_every_module():
    import re

    entries = layout_map()
    missing = []
    for name in modules():
        parts = name.split(".")
        if len(parts) != 3 or parts[2].startswith("__"):
            continue
        if not re.search(rf"\b{parts[2]}\b", entries.get(parts[1], "")):
            missing.append(name)
    assert set(entries) == set(STAGES) and missing == [], f"docs/development.md's layout map misses {missing}"


# A run folder's own files, and the one module that names them (everything else asks its RunFolder).
RUN_FILES = ("config.yaml", "metrics.jsonl", "README.md")
RUN_FOLDER_OWNER = "florence_kit.train.runfolder"


def run_file_literals(path: Path) -> list[tuple[int, str]]:
    """String constants in ``path`` that are a run file's name or end in it as a path (prose is left alone)."""
    import re

    named = re.compile(r"^(.*/)?\.?(" + "|".join(map(re.escape, RUN_FILES)) + r")(\.tmp)?$")
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        and named.match(node.value.strip())
    )


def test_only_the_run_folder_names_its_files():
    found = [f"{name}:{line}: {text!r}" for name, path in modules().items() if name != RUN_FOLDER_OWNER
             for line, text in run_file_literals(path)]
    assert found == [], f"ask florence_kit.train.runfolder.RunFolder for these run files instead: {found}"
    assert len(run_file_literals(modules()[RUN_FOLDER_OWNER])) == len(RUN_FILES)


def test_the_run_file_check_sees_a_path_literal(tmp_path: Path):
    """The check above would catch the ways a module names a run file (and not prose about it)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Reads config.yaml."""\n'
        'a = out / "config.yaml"\n'
        'b = f"{out}/metrics.jsonl"\n'
        'c = out / ".config.yaml.tmp"\n'
        'd = "README.md"\n'
        'e = "no config.yaml here; pass a run folder"\n'
    )
    assert [line for line, _ in run_file_literals(sample)] == [2, 3, 4, 5]
