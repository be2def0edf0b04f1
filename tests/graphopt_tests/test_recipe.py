"""Recipe files (schema in graphopt/recipe.py): every key, validation, CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest
import yaml

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
        ({"seed": "7"}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
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


# ---- pass option types, one source of defaults, recipes beside flags ----------------------


class TypedPass(GraphPass):
    """Test only: one option of each declared type; records what it was given."""

    name = "test-typed"
    options = (
        PassOption("force", bool, False, "a flag"),
        PassOption("count", int, 2, "a count"),
        PassOption("ratio", float, 0.5, "a ratio"),
        PassOption("label", str, "", "a label"),
        PassOption("kind", str, "a", "a choice", choices=("a", "b")),
        PassOption("share", float, -1.0, "a bounded share", bounds=(0.0, 0.9)),
    )
    seen: ClassVar[list[dict]] = []

    def rewrite(self, model: ir.Model) -> int:
        TypedPass.seen.append(dict(self.settings))
        return 0


@pytest.fixture
def typed(monkeypatch) -> type[TypedPass]:
    register_for_test(monkeypatch, TypedPass)
    monkeypatch.setattr(TypedPass, "seen", [])
    return TypedPass


def test_option_values_are_converted_to_the_declared_types(tmp_path: Path, capsys, typed) -> None:
    recipe = write(
        tmp_path,
        "passes:\n  - name: test-typed\n"
        '    options: {force: "false", count: "16", ratio: "0.25", label: x, kind: b, '
        "share: 0.9}\n",
    )
    options = load_recipe(recipe)
    expected = {"force": False, "count": 16, "ratio": 0.25, "label": "x", "kind": "b", "share": 0.9}
    assert options.passes == [PassSpec("test-typed", expected)]
    assert main(["optimize", str(model_file(tmp_path)), "--recipe", str(recipe)]) == 0
    # Before: the pass got the string "false", which is truthy: `force: "false"` forced.
    assert typed.seen and all(seen == expected for seen in typed.seen)


@pytest.mark.parametrize(
    ("value", "bools"),
    [("yes", True), ("No", False), ("on", True), ("0", False), (1, True), (False, False)],
)
def test_boolean_spellings(value, bools: bool, typed) -> None:
    assert typed(force=value).settings["force"] is bools


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"force": "maybe"}, "option 'force': expected true or false, got 'maybe'"),
        ({"force": 2}, "option 'force': expected true or false, got 2"),
        ({"count": 1.5}, "option 'count': expected an integer, got 1.5"),
        ({"count": True}, "option 'count': expected an integer, got True"),
        ({"ratio": "small"}, "option 'ratio': expected a finite number, got 'small'"),
        ({"ratio": True}, "option 'ratio': expected a finite number, got True"),
        ({"label": 3}, "option 'label': expected a string, got 3"),
        # NaN passes any range check written as comparisons; infinities are no setting.
        ({"ratio": float("nan")}, "option 'ratio': expected a finite number, got nan"),
        ({"ratio": "inf"}, "option 'ratio': expected a finite number, got 'inf'"),
        # Choices and bounds hold for recipes and the API, not only argparse's flags.
        ({"kind": "c"}, "option 'kind': expected one of a, b, got 'c'"),
        ({"share": 1.0}, r"option 'share': expected a number in \[0, 0.9\], got 1.0"),
        ({"share": -0.5}, r"option 'share': expected a number in \[0, 0.9\], got -0.5"),
    ],
)
def test_wrong_option_types_are_exit_2_naming_pass_and_option(
    tmp_path: Path, capsys, typed, options: dict, message: str
) -> None:
    with pytest.raises(UserInputError, match=f"pass 'test-typed' {message}"):
        recipe_from_dict({"passes": [{"name": "test-typed", "options": options}]})
    with pytest.raises(UserInputError, match=message):  # the API: when the pass is built
        typed(**options)
    recipe = tmp_path / "typed.yaml"
    recipe.write_text(yaml.safe_dump({"passes": [{"name": "test-typed", "options": options}]}))
    code = main(["optimize", str(model_file(tmp_path)), "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pass 'test-typed' option" in err


def test_a_wrong_value_is_shown_on_one_short_line(typed) -> None:
    # The API: an array where a path goes (calib={"x": array}) printed its repr over lines.
    with pytest.raises(UserInputError) as caught:
        typed(label=np.zeros((40, 40)))
    message = str(caught.value)
    assert message.startswith("pass 'test-typed' option 'label': expected a string, got array(")
    assert "\n" not in message and message.endswith("...") and len(message) < 160


def test_unknown_option_from_the_api_is_bad_input_not_a_crash(tmp_path: Path, capsys) -> None:
    from graphopt.api import OptimizeOptions, optimize

    options = OptimizeOptions(lossy=[PassSpec("test-lossy", {"ratio": 0.3, "nope": 1})])
    # Before: ValueError from the pass constructor, an internal error (exit 3).
    with pytest.raises(UserInputError, match=r"pass 'test-lossy' has no option\(s\) \['nope'\]"):
        optimize(str(model_file(tmp_path)), None, options)


def test_prune_option_defaults_have_one_source(monkeypatch, capsys, tmp_path: Path) -> None:
    import dataclasses

    import graphopt.api
    from graphopt.api import OptimizeOptions
    from graphopt.passes.pruning.prune import PrunePass

    # Change the declared default: every way of asking for pruning must follow it.
    changed = tuple(
        dataclasses.replace(o, default=0.5) if o.name == "max_group_ratio" else o
        for o in PrunePass.options
    )
    monkeypatch.setattr(PrunePass, "options", changed)
    captured: list[OptimizeOptions] = []

    def capture(source, output, options, **kwargs):
        captured.append(options)
        raise KeyboardInterrupt  # stop there

    monkeypatch.setattr(graphopt.api, "optimize", capture)
    assert main(["optimize", str(model_file(tmp_path)), "--prune", "flops=0.3"]) == 130
    specs = {
        "cli": captured[0].lossy_specs(),
        "api": OptimizeOptions(prune="flops=0.3").lossy_specs(),
        "recipe": recipe_from_dict(
            {"lossy": [{"name": "prune", "options": {"flops": 0.3}}]}
        ).lossy_specs(),
    }
    for where, (spec,) in specs.items():
        # Before: the CLI and the API passed their own 0.8 along.
        assert PrunePass(**spec.options).settings["max_group_ratio"] == 0.5, where


def test_recipe_lossy_beside_passes_that_do_not_list_it_is_exit_2(tmp_path: Path, capsys) -> None:
    recipe = write(
        tmp_path, "passes: [dead-code]\nlossy:\n  - name: prune\n    options: {flops: 0.3}\n"
    )
    code = main(["optimize", str(model_file(tmp_path)), "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip()
    # Before: exit 0 with the lossy entry silently dropped.
    assert code == 2 and err.count("\n") == 0
    assert "prune asked for next to an explicit pass list" in err


def _pruning_recipe(tmp_path: Path, body: str) -> tuple[Path, Path]:
    from graphopt import io
    from graphopt_tests.passes.pruning.graphs import mlp

    model = tmp_path / "mlp.onnx"
    io.save(mlp(), model)
    return model, write(tmp_path, body)


def test_recipe_lossy_options_go_to_the_pass_its_list_names(tmp_path: Path, capsys) -> None:
    model, recipe = _pruning_recipe(
        tmp_path,
        "passes: [dead-code, prune, dead-code]\n"
        "lossy:\n  - name: prune\n    options: {flops: 0.3, round_to: 1}\n",
    )
    # Before: the listed prune ran without the lossy entry's options: "give exactly one
    # target", exit 2.
    assert main(["optimize", str(model), "--recipe", str(recipe)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "pruning flops=0.3: 19 units from 1/1 groups" in text


def test_pruning_flags_refine_a_recipe_that_prunes(tmp_path: Path, capsys) -> None:
    model, recipe = _pruning_recipe(
        tmp_path, "lossy:\n  - name: prune\n    options: {flops: 0.3, criterion: l2}\n"
    )
    # Before: "--criterion only applies with --prune", exit 2, although the recipe prunes.
    code = main(["optimize", str(model), "--recipe", str(recipe), "--criterion", "l1"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "prune: criterion l1, " in text


def test_recipe_pins_the_seed_of_generated_inputs() -> None:
    # The seed decides which passes verification rolls back, and the output records it.
    assert recipe_from_dict({"seed": 7}).seed == 7
    assert recipe_from_dict({}).seed == 0
