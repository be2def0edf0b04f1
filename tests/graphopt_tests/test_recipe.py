"""Recipe files (schema in graphopt/recipe.py): every key, validation, CLI overrides."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.pipeline import PassSpec
from graphopt.recipe import load_recipe, recipe_from_dict
from graphopt.registry import GraphPass, PassOption, Stage
from graphopt_tests.helpers import register_for_test
from graphopt_tests.test_cli import model_file

FULL = """
version: 1
passes:
  - dead-code
  - name: test-with-options
    options: {ratio: 0.5}
skip: [cse]
lossy:
  - name: test-lossy
    options: {ratio: 0.3}
verify: false
tolerance: 1.0e-3
fold_limit: 2MB
input_shapes:
  input: [1, 3, 224, 224]
external_data: true
target: ort
"""


class WithOptionsPass(GraphPass):
    """Test only: an exact pass with one option."""

    name = "test-with-options"
    options = (PassOption("ratio", float, 1.0, "a ratio"),)

    def rewrite(self, model: ir.Model) -> int:
        return 0


class LossyPass(GraphPass):
    """Test only: a lossy pass with one option."""

    name = "test-lossy"
    exact = False
    stage = Stage.PRUNE
    options = (PassOption("ratio", float, 0.5, "a ratio"),)

    def rewrite(self, model: ir.Model) -> int:
        return 0


@pytest.fixture(autouse=True)
def _fake_passes(monkeypatch) -> None:
    register_for_test(monkeypatch, WithOptionsPass, LossyPass)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_recipe(tmp_path: Path) -> None:
    options = load_recipe(write(tmp_path, FULL))
    assert options.passes == [PassSpec("dead-code"), PassSpec("test-with-options", {"ratio": 0.5})]
    assert options.skip == ["cse"]
    assert options.lossy == [PassSpec("test-lossy", {"ratio": 0.3})]
    assert options.verify is False
    assert options.tolerance == 1e-3
    assert options.fold_limit_bytes == 2 << 20
    assert options.input_shapes == {"input": (1, 3, 224, 224)}
    assert options.external_data is True
    assert options.target == "ort"


def test_empty_recipe_means_defaults(tmp_path: Path) -> None:
    options = load_recipe(write(tmp_path, "# nothing\n"))
    assert options.passes is None and options.verify and options.external_data is None
    assert options.fold_limit_bytes == 1 << 20
    assert recipe_from_dict({"fold_limit": "none"}).fold_limit_bytes is None
    assert recipe_from_dict({"external_data": None}).external_data is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "mapping"),
        ({"pases": []}, "unknown key"),
        ({"version": 2}, "version 2"),
        ({"passes": "dead-code"}, "passes must be a list"),
        ({"passes": ["no-such-pass"]}, "unknown pass"),
        ({"passes": [{"name": "test-with-options", "options": {"nope": 1}}]}, "no option"),
        ({"passes": [{"name": "test-with-options", "options": [1]}]}, "must be a mapping"),
        ({"passes": [{"name": "dead-code", "extra": 1}]}, "a pass entry is"),
        ({"passes": [3]}, "a pass entry is"),
        ({"skip": ["nope"]}, "unknown pass"),
        ({"lossy": [{"name": "test-lossy", "options": {"bad": 1}}]}, "no option"),
        ({"verify": "yes"}, "verify must be true or false"),
        ({"external_data": 1}, "external_data must be true or false"),
        ({"tolerance": "small"}, "tolerance must be a number"),
        ({"fold_limit": "lots"}, "size 'lots'"),
        ({"input_shapes": [1, 2]}, "input_shapes maps"),
        ({"input_shapes": {"x": ["a"]}}, "integers"),
        ({"target": "gpu"}, "target must be one of"),
    ],
)
def test_invalid_recipes(data, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        recipe_from_dict(data)


def test_unreadable_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_recipe(write(tmp_path, "passes: [unclosed\n"))
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_recipe_with_overrides(tmp_path: Path, capsys) -> None:
    model = model_file(tmp_path)
    recipe = write(tmp_path, "passes: [dead-code]\nverify: false\n")
    assert main(["optimize", str(model), "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "dead-code" in out and "not verified" in out
    # --passes given next to --recipe wins over the recipe's list.
    assert main(["optimize", str(model), "--recipe", str(recipe), "--passes", "identity"]) == 0
    out = capsys.readouterr().out
    assert "identity" in out


def test_cli_bad_recipe_is_exit_2(tmp_path: Path, capsys) -> None:
    model = model_file(tmp_path)
    recipe = write(tmp_path, "passes: [no-such-pass]\n")
    assert main(["optimize", str(model), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown pass" in err and "Traceback" not in err
