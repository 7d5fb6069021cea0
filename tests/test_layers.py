"""The layer rule of docs/design.rst §18: no module of ``bgf_pyg`` imports a layer above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bgf_pyg"


def stated_layers(design: str) -> dict[str, int]:
    """Module name → layer number, from the §18 table (``bgf_pyg`` is the package root; any
    other name stands for ``bgf_pyg.NAME`` and everything below it)."""
    section = re.search(r"^§18 .*\n-+\n(.*?)(?=^§\d+ .*\n-+\n|\Z)", design, re.S | re.M).group(1)
    rows = re.findall(r"^   \* - (\d+) [\w ]+\n     - (.+)$", section, re.M)
    assert rows, "docs/design.rst §18 has no layer table"
    layers = {}
    for number, modules in rows:
        for name in re.findall(r"``([\w.]+)``", modules):
            layers[name if name == "bgf_pyg" else f"bgf_pyg.{name}"] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int:
    """The layer of a dotted module name: its own entry or its closest listed package's."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in layers and (end > 1 or module == "bgf_pyg"):
            return layers[".".join(parts[:end])]
    raise AssertionError(f"{module} is in no layer of docs/design.rst §18")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, root: Path) -> set[str]:
    """The package modules ``path`` imports anywhere in its code: ``from X import Y`` counts as
    ``X.Y`` where that is a module, else as ``X`` (a name ``X`` defines or re-exports)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != root.name:
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if is_module(child, root) else source)
    return found


def upward_imports(root: Path, layers: dict[str, int]) -> list[str]:
    """Every import of a module of a higher layer, as ``importer (layer) -> imported (layer)``."""
    broken = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        own = layer_of(importer, layers)
        for imported in sorted(imported_modules(path, root)):
            if layer_of(imported, layers) > own:
                broken.append(f"{importer} ({own}) -> {imported} ({layer_of(imported, layers)})")
    return broken


def test_no_module_imports_a_layer_above_its_own():
    layers = stated_layers((ROOT / "docs" / "design.rst").read_text(encoding="utf-8"))
    assert upward_imports(PACKAGE, layers) == []


def test_every_module_is_in_exactly_the_layers_the_table_names():
    """Every module has a layer, and every name in the table is a module (no stale entry)."""
    layers = stated_layers((ROOT / "docs" / "design.rst").read_text(encoding="utf-8"))
    modules = [module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")]
    assert len(modules) > 50
    for module in modules:
        layer_of(module, layers)  # raises for a module the table does not place
    assert [name for name in layers if not is_module(name, PACKAGE)] == []


#: A two-layer package for the scan's own test: ``low`` below ``high``.
LAYERS = {"bgf_pyg": 1, "bgf_pyg.low": 1, "bgf_pyg.high": 2}


@pytest.mark.parametrize("text,imported", [
    ("from bgf_pyg.high import thing\n", "bgf_pyg.high"),
    ("from .high import thing\n", "bgf_pyg.high"),
    ("from . import high\n", "bgf_pyg.high"),
    ("import bgf_pyg.high.deep\n", "bgf_pyg.high.deep"),
    ("def f():\n    from .high.deep import thing\n", "bgf_pyg.high.deep"),
    ("from bgf_pyg import root_name\n", None),
    ("from .low import thing\n", None),
])
def test_the_scan_finds_an_import_of_a_higher_layer(tmp_path, text, imported):
    root = tmp_path / "bgf_pyg"
    (root / "high").mkdir(parents=True)
    for name in ("__init__.py", "high/__init__.py", "high/deep.py"):
        (root / name).write_text("")
    (root / "low.py").write_text(text)
    expected = [f"bgf_pyg.low (1) -> {imported} (2)"] if imported else []
    assert upward_imports(root, LAYERS) == expected
