"""The wheel ships every package: pyproject's explicit list matches the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = config["package-dir"]
    found = set()
    for package, folder in folders.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if any(part.startswith(".") or part == "__pycache__" for part in init.parts):
                continue
            relative = init.parent.relative_to(base)
            name = ".".join((package, *relative.parts)) if relative.parts else package
            # a sub-folder mapped separately (graphopt.passes → passes/) is found there
            if not any(
                name.startswith(other + ".") or name == other
                for other in folders
                if other != package and other.startswith(package + ".")
            ):
                found.add(name)
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
