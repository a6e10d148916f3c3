"""Imports only go down the floors of DESIGN.md (plus streaming.py, beside api): cli → api/hub/evaluate/deploy → calibrate/checkpoint →
solvers/allocation/formats/recipe → masks/models/data/kernels/distributed → errors."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {
    "cli": 5,
    "api": 4, "hub": 4, "evaluate": 4, "deploy": 4, "bench": 4, "streaming": 4, "hf": 4,
    "calibrate": 3, "checkpoint": 3,
    "solvers": 2, "allocation": 2, "formats": 2, "recipe": 2,
    "masks": 1, "models": 1, "data": 1, "kernels": 1, "distributed": 1, "files": 1,
    "errors": 0,
}


def floor_of(module: str):
    parts = module.split(".")
    if parts[0] != "llmprune" or len(parts) == 1:
        return None
    return FLOORS.get(parts[1])


def modules():
    for path in sorted((REPO / "llmprune").rglob("*.py")):
        rel = path.relative_to(REPO / "llmprune").with_suffix("")
        if rel.parts[0] in ("__init__", "__main__"):
            continue  # the package's public face may reach anything
        yield f"llmprune.{'.'.join(rel.parts)}", path
    for path in sorted((REPO / "cli").rglob("*.py")):
        yield "llmprune.cli", path


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v))
def test_imports_only_go_down(name, path):
    own = floor_of(name)
    assert own is not None, f"{name} has no floor in DESIGN.md's layout"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "llmprune"]
        for target in targets:
            floor = floor_of(target)
            if floor is not None:
                assert floor <= own, f"{name} (floor {own}) imports {target} (floor {floor}) at line {node.lineno}"


def test_solvers_know_nothing_of_models_files_or_cli():
    for path in (REPO / "llmprune" / "solvers").glob("*.py"):
        text = path.read_text()
        for banned in ("transformers", "llmprune.models", "llmprune.cli", "open(", "print(", ".cuda()"):
            assert banned not in text, f"{path.name} mentions {banned}"
