"""Layering: the core (graphopt/*.py, analysis/) never imports a pass; analysis never edits.

Passes are plugins: the registry loads the package ``graphopt.passes`` by name (the one
import allowed), and everything else reaches a pass through the registry, so a new lossy pass
changes no core module. Transformations (channel removal) and the zeroed-vs-removed harness
belong to pruning, not to the analysis that only reads models.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "graphopt"
# The registry's plugin loader imports the passes package itself, and nothing from it.
ALLOWED = {("graphopt/registry.py", "graphopt.passes")}


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _core_modules() -> list[Path]:
    return sorted([*PACKAGE.glob("*.py"), *(PACKAGE / "analysis").rglob("*.py")])


def test_the_core_imports_no_pass() -> None:
    offenders = []
    for path in _core_modules():
        relative = str(path.relative_to(ROOT))
        for name in sorted(_imports(path)):
            is_pass = name == "graphopt.passes" or name.startswith("graphopt.passes.")
            if is_pass and (relative, name) not in ALLOWED:
                offenders.append(f"{relative} imports {name}")
    assert offenders == []


def test_the_scan_sees_lazy_imports() -> None:
    assert len(_core_modules()) > 20
    source = PACKAGE / "registry.py"
    assert "graphopt.passes" in _imports(source)


def test_transformations_live_with_the_pass_that_uses_them() -> None:
    analysis = {p.stem for p in (PACKAGE / "analysis").glob("*.py")}
    assert not analysis & {"channel_removal", "zig_check"}, analysis
