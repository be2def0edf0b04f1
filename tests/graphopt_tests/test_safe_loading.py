"""Source scan: no code path in graphopt deserializes data in a way that can run code.

Flags, in graphopt/ (with its passes/, backends/, kernels/, models/) and bench/:
``torch.load`` without ``weights_only=True``; ``np.load`` without ``allow_pickle=False``;
``pickle``/``dill``/``joblib``/``marshal``/``shelve`` loads; ``yaml.load`` and friends
(``yaml.safe_load`` is fine); the ``eval``/``exec`` builtins; and custom-op library or
``ctypes`` loading anywhere but ``graphopt/backends/ort_custom_ops.py``. Imports are followed
through aliases (``import numpy as xp``, ``from torch import load``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("graphopt", "bench")
LIBRARY_POLICY = Path("graphopt/backends/ort_custom_ops.py")

_ALWAYS_UNSAFE = {
    "pickle.load": "unpickling runs code",
    "pickle.loads": "unpickling runs code",
    "pickle.Unpickler": "unpickling runs code",
    "dill.load": "unpickling runs code",
    "dill.loads": "unpickling runs code",
    "joblib.load": "joblib unpickles",
    "marshal.load": "marshal loads code objects",
    "marshal.loads": "marshal loads code objects",
    "shelve.open": "shelve unpickles",
    "yaml.load": "use yaml.safe_load",
    "yaml.unsafe_load": "use yaml.safe_load",
    "yaml.full_load": "use yaml.safe_load",
    "torch.serialization.load": "use torch.load(..., weights_only=True)",
    "numpy.lib.format.read_array": "use np.load(..., allow_pickle=False)",
}
_LIBRARY_LOADERS = ("ctypes.CDLL", "ctypes.cdll.LoadLibrary", "ctypes.PyDLL", "ctypes.WinDLL")


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


class _Scanner(ast.NodeVisitor):
    def __init__(self, relative: Path) -> None:
        self.relative = relative
        self.aliases: dict[str, str] = {}  # local name -> dotted module path
        self.problems: list[str] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, func: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        head = self.aliases.get(func.id, func.id)
        return ".".join([head, *reversed(parts)])

    def _flag(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.relative}:{node.lineno}: {message}")

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            if node.func.id not in self.aliases:  # the builtin, not an imported function
                self._flag(node, f"{node.func.id}() runs arbitrary code")
        elif name in ("torch.load",) and not _keyword_is(node, "weights_only", True):
            self._flag(node, "torch.load without weights_only=True")
        elif name in ("numpy.load",) and not _keyword_is(node, "allow_pickle", False):
            self._flag(node, "np.load without allow_pickle=False (use graphopt.calibration)")
        elif name in _ALWAYS_UNSAFE:
            self._flag(node, f"{name}: {_ALWAYS_UNSAFE[name]}")
        elif self.relative != LIBRARY_POLICY and (
            name in _LIBRARY_LOADERS
            or (
                isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("register_custom_ops")
            )
        ):
            self._flag(
                node, "native libraries load only through graphopt/backends/ort_custom_ops.py"
            )
        self.generic_visit(node)


def scan_source(source: str, relative: Path) -> list[str]:
    scanner = _Scanner(relative)
    scanner.visit(ast.parse(source, filename=str(relative)))
    return scanner.problems


def _sources() -> list[Path]:
    files = [p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))]
    return [p for p in files if "_build" not in p.parts and "__pycache__" not in p.parts]


def test_package_source_has_no_unsafe_loading() -> None:
    files = _sources()
    assert len(files) > 50, "the scan found too few files: wrong root?"
    problems = [
        problem
        for path in files
        for problem in scan_source(path.read_text(encoding="utf-8"), path.relative_to(ROOT))
    ]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


_BAD = """
import pickle, yaml, ctypes
import numpy as xp
import torch
from torch import load as tload
from pickle import loads
xp.load("a.npy")
xp.load("a.npz", allow_pickle=True)
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
tload("m.pt")
pickle.load(open("f", "rb"))
loads(b"")
yaml.load("a: 1")
eval("1 + 1")
exec("x = 1")
ctypes.CDLL("libx.so")
opts.register_custom_ops_library("libx.so")
"""

_GOOD = """
import numpy as np
import torch
import yaml
np.load("a.npz", allow_pickle=False)
torch.load("m.pt", weights_only=True)
yaml.safe_load("a: 1")
module.eval()
np.savez("a.npz", x=1)
"""


def test_scanner_flags_every_unsafe_form() -> None:
    problems = scan_source(_BAD, Path("graphopt/example.py"))
    lines = sorted(int(p.split(":")[1]) for p in problems)
    expected = [n for n, text in enumerate(_BAD.splitlines(), 1) if "(" in text]
    assert lines == expected, problems


def test_scanner_accepts_the_safe_forms() -> None:
    assert scan_source(_GOOD, Path("graphopt/example.py")) == []


def test_library_loading_is_allowed_only_in_the_policy_module() -> None:
    code = 'opts.register_custom_ops_library("x.so")\n'
    assert scan_source(code, LIBRARY_POLICY) == []
    assert scan_source(code, Path("graphopt/backends/other.py"))


@pytest.mark.parametrize("top", SCANNED)
def test_every_scanned_folder_exists(top: str) -> None:
    assert (ROOT / top).is_dir()
