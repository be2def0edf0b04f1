"""Packaging: the checkout never shadows an installed module, and the wheel ships every package.

Running from the repository root (``python -m pytest``, ``python -m graphopt``, pytest-xdist
workers) puts the root on ``sys.path``. A top-level folder of the checkout that is a Python
package would then win over an installed distribution of the same import name: a top-level
``kernels/`` once hid the ``kernels`` distribution that transformers imports. So every Python
package lives under ``graphopt/`` and the tests under ``tests/graphopt_tests/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The only import names the checkout may expose from its root or from tests/.
OWN_TOP_LEVEL = {"graphopt"}
OWN_TEST_PACKAGE = "graphopt_tests"
WHEEL_PACKAGES = (
    "graphopt",
    "graphopt.analysis",
    "graphopt.passes",
    "graphopt.passes.erasure",
    "graphopt.passes.fusion",
    "graphopt.passes.fusion.ort",
    "graphopt.passes.pruning",
    "graphopt.backends",
    "graphopt.kernels",
    "graphopt.models",
)

# Run in this process and in a fresh interpreter started from the root: for each top-level
# folder (or module) name of the checkout that an installed distribution also provides, where
# does the import resolve? Prints {name: [distribution, resolved files, inside dist?]}.
_RESOLVE = r"""
import importlib, json, sys
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

root = Path(sys.argv[1]).resolve()
names = json.loads(sys.argv[2])
provided = packages_distributions()
out = {}
for name in names:
    dist = distribution(provided[name][0])
    base = Path(dist.locate_file("")).resolve()
    module = importlib.import_module(name)
    places = [module.__file__] if getattr(module, "__file__", None) else []
    places += list(getattr(module, "__path__", []))
    files = [str(Path(p).resolve()) for p in places]
    # Inside the distribution's install folder, not the checkout's folder of that name (a
    # venv inside the checkout puts site-packages under the root too).
    inside = all(
        Path(f).is_relative_to(base) and not Path(f).is_relative_to(root / name) for f in files
    )
    out[name] = [dist.metadata["Name"], files, inside]
print(json.dumps(out))
"""


def _top_level_names(folder: Path) -> set[str]:
    """Names a folder on sys.path would expose: sub-folders and ``*.py`` modules."""
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


def _shadow_candidates() -> list[str]:
    provided = packages_distributions()
    names = _top_level_names(ROOT) | _top_level_names(ROOT / "tests")
    return sorted(n for n in names if n in provided and n not in OWN_TOP_LEVEL)


def _check(resolved: dict[str, list]) -> list[str]:
    return [
        f"`import {name}` resolves to {files}, not to the {dist} distribution"
        for name, (dist, files, inside) in resolved.items()
        if not inside
    ]


def test_no_checkout_folder_is_a_python_package_but_graphopt() -> None:
    """Now or later: a folder with ``__init__.py`` at the root could shadow a future release."""
    packages = {
        entry.name
        for folder in (ROOT, ROOT / "tests")
        for entry in folder.iterdir()
        if entry.is_dir() and (entry / "__init__.py").exists()
    }
    modules = {p.stem for p in (*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"))}
    assert packages <= OWN_TOP_LEVEL | {OWN_TEST_PACKAGE}, packages
    assert modules <= {"conftest"}, modules


def test_own_import_names_belong_to_no_distribution() -> None:
    provided = packages_distributions()
    assert OWN_TEST_PACKAGE not in provided, provided.get(OWN_TEST_PACKAGE)
    owners = set(provided.get("graphopt", []))
    assert owners <= {"graphopt"}, owners


def test_installed_modules_resolve_to_their_distribution_in_this_process() -> None:
    names = _shadow_candidates()
    # The subprocess's code, run here: this process's sys.path is the one pytest (and
    # pytest-xdist, for its workers) built.
    scope: dict = {}
    argv = sys.argv
    try:
        sys.argv = ["-", str(ROOT), json.dumps(names)]
        exec(compile(_RESOLVE.replace("print(json.dumps(out))", ""), "<resolve>", "exec"), scope)
    finally:
        sys.argv = argv
    assert _check(scope["out"]) == []
    assert set(scope["out"]) == set(names)


def test_installed_modules_resolve_to_their_distribution_from_the_root() -> None:
    names = _shadow_candidates()
    # `python -c` run with the root as working directory puts the root first on sys.path, as
    # `python -m pytest` and `python -m graphopt` do.
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE, str(ROOT), json.dumps(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert _check(resolved) == []
    assert set(resolved) == set(names)


def test_the_guard_sees_a_shadowing_folder(tmp_path: Path) -> None:
    """The check itself: a package folder named like an installed module is caught."""
    victim = next(iter(sorted(n for n in packages_distributions() if n.isidentifier())))
    (tmp_path / victim).mkdir()
    (tmp_path / victim / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE, str(tmp_path), json.dumps([victim])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert _check(resolved), resolved


@pytest.mark.slow
def test_the_wheel_ships_every_package(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ and *.egg-info in the folder it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "_build", "*.egg-info")
    shutil.copytree(ROOT / "graphopt", source / "graphopt", ignore=ignore)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("graphopt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for package in WHEEL_PACKAGES:
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert "graphopt/models/data/sentences.txt" in names
    tops = {name.split("/")[0] for name in names if not name.startswith("graphopt-")}
    assert tops == {"graphopt"}, tops
    assert not any("__pycache__" in name or "/_build/" in name for name in names)


def test_installed_graphopt_is_this_checkout() -> None:
    import graphopt

    assert Path(graphopt.__file__).resolve().is_relative_to(ROOT)
    assert distribution("graphopt").metadata["Name"] == "graphopt"
