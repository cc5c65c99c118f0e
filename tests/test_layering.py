"""The package layering contract: ``vilex`` <- ``vlm`` <- ``benchmarks`` <- ``toy`` <- ``serve``, and ``toy.scenes`` is
a leaf.

A module may import its own package and the packages below it, never one above (imports inside functions count:
a lazy import is still a dependency); no package below ``toy`` imports any part of it. ``toy.scenes`` (the scene
generator) is a leaf besides: it needs only the standard library, numpy and PIL (plus pyarrow for the datasets'
parquet files and tqdm for a progress bar, both imported where used), so the tests may use it on their own.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("vilex", "vlm", "benchmarks", "toy", "serve")  # bottom to top
LEAF = "toy.scenes"
LEAF_THIRD_PARTY = {"numpy", "PIL", "pyarrow", "tqdm"}


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved against ``module``)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                out.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
    return out


def _layer(name: str) -> str | None:
    if name == LEAF or name.startswith(LEAF + "."):
        return LEAF
    top = name.split(".")[0]
    return top if top in LAYERS else None


def violations(module: str, imports: list[str]) -> list[str]:
    """The imports of ``module`` that break the contract, as 'module -> import (why)'."""
    own = _layer(module)
    bad = []
    for name in imports:
        target = _layer(name)
        if own == LEAF:
            top = name.split(".")[0]
            if target not in (None, LEAF) or (target is None and top not in sys.stdlib_module_names
                                               and top not in LEAF_THIRD_PARTY and top != "__future__"):
                bad.append(f"{module} -> {name} (toy.scenes is a leaf: stdlib, numpy, PIL)")
            continue
        if target is None or own is None:
            continue
        target_package = target.split(".")[0]  # the leaf belongs to toy's layer
        if LAYERS.index(target_package) > LAYERS.index(own.split(".")[0]):
            bad.append(f"{module} -> {name} ({own} sits below {target_package})")
    return bad


def project_modules() -> list[tuple[str, Path]]:
    found = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def test_every_package_imports_only_downwards():
    modules = project_modules()
    assert {m.split(".")[0] for m, _ in modules} == set(LAYERS)
    assert any(m.startswith(LEAF) for m, _ in modules)
    bad = [v for module, path in modules
           for v in violations(module, imported_modules(path.read_text(), module, path.name == "__init__.py"))]
    assert bad == [], "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, expected", [
    ("vilex.train.loop", "from vlm.model import VLM", "vilex.train.loop -> vlm.model (vilex sits below vlm)"),
    ("vlm.train", "def f():\n    import benchmarks.sweep", "vlm.train -> benchmarks.sweep (vlm sits below benchmarks)"),
    ("benchmarks.tiny", "from toy.probe import judge", "benchmarks.tiny -> toy.probe (benchmarks sits below toy)"),
    ("benchmarks.tiny", "from toy.scenes import generate_dataset",
     "benchmarks.tiny -> toy.scenes (benchmarks sits below toy)"),
    ("toy.scenes.world", "import torch", "toy.scenes.world -> torch (toy.scenes is a leaf: stdlib, numpy, PIL)"),
    ("toy.scenes.generate", "from vilex.errors import UserError",
     "toy.scenes.generate -> vilex.errors (toy.scenes is a leaf: stdlib, numpy, PIL)"),
    ("toy.scenes.generate", "from ..probe import judge",
     "toy.scenes.generate -> toy.probe (toy.scenes is a leaf: stdlib, numpy, PIL)"),
])
def test_the_check_catches_each_kind_of_violation(module, source, expected):
    assert violations(module, imported_modules(source, module, is_package=False)) == [expected]


@pytest.mark.parametrize("module, source", [
    ("toy.tiny_suite", "from toy.scenes import generate_dataset\nfrom benchmarks.toy_tasks import TOY_TASKS"),
    ("toy.claims", "from vilex.metrics import psnr\nfrom vlm.model import VLM\nfrom benchmarks.sweep import run_sweep"),
    ("toy.scenes.world", "import numpy as np\nfrom PIL import Image\nimport json\nfrom toy.scenes import errors"),
])
def test_the_check_allows_downward_and_leaf_imports(module, source):
    assert violations(module, imported_modules(source, module, is_package=False)) == []
