"""Layers one way: no module of dmdl_cli imports one from a layer above its own.

The layers, bottom to top (docs/architecture.md):

    core        errors, atomic, console, datasets, recipe, stages, selected, runtime, workspace,
                provenance
    data        data/ (index, sources, cache, augment, sampling, synthetic, prepare)
    model       model/ (backbone, CAI, loading)
    context     context.py (what a stage reads: index, cache, runtime, model)
    features    features/ (extraction, BatchNorm re-estimation)
    clustering  clustering/
    training    training/
    results     evaluation/, export.py, inference.py, report/, selection/
    commands    runner.py, cli.py, __main__.py

Every import counts, also one inside a function; only imports under ``if TYPE_CHECKING:`` (type
hints, never executed) are left out. The test reads the source with ``ast``: it imports
nothing, so it fails on a reversal even in a module no other test loads.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dmdl_cli"
LAYERS = (
    ("core", ("errors", "atomic", "console", "datasets", "recipe", "stages", "selected", "runtime",
              "workspace", "provenance")),
    ("data", ("data",)),
    ("model", ("model",)),
    ("context", ("context",)),
    ("features", ("features",)),
    ("clustering", ("clustering",)),
    ("training", ("training",)),
    ("results", ("evaluation", "export", "inference", "report", "selection")),
    ("commands", ("runner", "cli", "__main__")),
)
LEVEL = {top: level for level, (_, tops) in enumerate(LAYERS) for top in tops}
# the two training stages share training/objectives.py and never import each other
STAGE_MODULES = ("dmdl_cli.training.single", "dmdl_cli.training.cross")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(module: str) -> str:
    """``dmdl_cli.training.loop`` -> ``training``; the package root (``__version__``) is core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every dmdl_cli import in ``path`` (``from dmdl_cli.x import y``
    counts as ``dmdl_cli.x.y`` when ``y`` is a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dmdl_cli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmdl_cli"):
            for alias in node.names:
                sub = PACKAGE.parent / (node.module.replace(".", "/") + f"/{alias.name}")
                is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                found.append((node.lineno, f"{node.module}.{alias.name}" if is_module else node.module))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_has_a_layer():
    unplaced = sorted({_top(_module_name(p)) for p in SOURCES} - set(LEVEL))
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path: Path):
    name = _module_name(path)
    level = LEVEL[_top(name)]
    upward = [f"line {line}: {target} ({LAYERS[LEVEL[_top(target)]][0]})"
              for line, target in imports_of(path) if LEVEL.get(_top(target), -1) > level]
    assert not upward, (f"{path.relative_to(PACKAGE.parent)} ({LAYERS[level][0]}) imports from "
                        f"a layer above: {'; '.join(upward)}")


def test_the_training_stages_do_not_import_each_other():
    for path in SOURCES:
        name = _module_name(path)
        if name in STAGE_MODULES:
            others = [t for _, t in imports_of(path) if t in STAGE_MODULES and t != name]
            assert not others, f"{name} imports {others}: share code through training/objectives.py"


def test_the_checker_sees_a_reversal(tmp_path: Path):
    """The checker itself: an import inside a function is found; one under TYPE_CHECKING is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from dmdl_cli.cli import app\n"
                     "def f():\n    from dmdl_cli.evaluation.evaluate import run_protocol\n")
    assert imports_of(probe) == [(5, "dmdl_cli.evaluation.evaluate")]
