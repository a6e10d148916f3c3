"""Imports only go down the floors that ARCHITECTURE.md's table sets out (read from there: one place)."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def read_floors() -> dict[str, int]:
    """{module: floor} from the '## Floors' table of ARCHITECTURE.md."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]+)\|", line)
        if match:
            for name in match.group(2).split(","):
                floors[name.strip()] = int(match.group(1))
    return floors


FLOORS = read_floors()


def test_the_table_names_every_module():
    on_disk = {p.stem for p in (REPO / "llmprune").glob("*.py") if p.stem not in ("__init__", "__main__")}
    on_disk |= {p.name for p in (REPO / "llmprune").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert on_disk | {"cli"} == set(FLOORS), f"ARCHITECTURE.md's floors differ from the modules: {sorted(on_disk ^ (set(FLOORS) - {'cli'}))}"


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
            if node.module == "llmprune":  # the package's face re-exports the top: modules import the module itself
                assert all(a.name in FLOORS for a in node.names), \
                    f"{name} imports {[a.name for a in node.names]} from the package at line {node.lineno}; import its module"
        for target in targets:
            floor = floor_of(target)
            if floor is not None:
                assert floor <= own, f"{name} (floor {own}) imports {target} (floor {floor}) at line {node.lineno}"


def test_solvers_know_nothing_of_models_files_or_cli():
    for path in (REPO / "llmprune" / "solvers").glob("*.py"):
        text = path.read_text()
        for banned in ("transformers", "llmprune.models", "llmprune.cli", "open(", "print(", ".cuda()"):
            assert banned not in text, f"{path.name} mentions {banned}"
