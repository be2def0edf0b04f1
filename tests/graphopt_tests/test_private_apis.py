"""Private modules of onnxscript/onnx-ir are imported in one place, under bounded versions."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOUNDED = ("onnxscript", "onnx-ir")
ALLOWED = Path("graphopt/private_apis.py")


def _private_imports(source: str) -> list[str]:
    """Dotted module names with a ``_private`` part that ``source`` imports from our deps."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in ("onnxscript", "onnx_ir") and any(
                p.startswith("_") and not p.startswith("__") for p in parts[1:]
            ):
                found.append(name)
    return found


def test_private_modules_are_imported_only_in_private_apis() -> None:
    offenders = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "graphopt").rglob("*.py"))
        if path.relative_to(ROOT) != ALLOWED
        and (names := _private_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_the_scan_sees_a_private_import() -> None:
    assert _private_imports("from onnxscript.rewriter import _ir_utils, pattern\n")
    assert _private_imports("import onnx_ir._core\n")
    assert not _private_imports("from onnxscript.rewriter import pattern\n")


def test_packages_with_private_use_are_bounded_above() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in BOUNDED:
        (spec,) = [d for d in deps if re.match(rf"{re.escape(package)}\b[<>=!~ ]", d)]
        assert "<" in spec, f"{package} has no upper bound: {spec}"
