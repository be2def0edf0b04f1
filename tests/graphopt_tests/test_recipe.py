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


# ---- YAML types, keys, aliases and files: refused in one line, naming recipe and key --------


def _cli_error(tmp_path: Path, capsys, text: str, *flags: str) -> tuple[int, str]:
    """Exit code and stderr of `graphopt optimize` with the recipe ``text``."""
    recipe = write(tmp_path, text)
    code = main(["optimize", str(model_file(tmp_path)), "--recipe", str(recipe), *flags])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Before: exit 3, "internal error: ValueError: negative dimensions are not allowed".
        ("{x: [-1, 4]}", r"input_shapes.x: --input-shape 'x:-1x4': dims must be non-negative"),
        # Before: 2.7 was cut to 2, true was 1, "2316" was read char by char as 2x3x1x6.
        ("{x: [2.7, 4]}", "input_shapes.x: dims must be integers, got 2.7"),
        ("{x: [true, 4]}", "input_shapes.x: dims must be integers, got true"),
        ("{x: '2316'}", "input_shapes.x: expected a list of dims, got '2316'"),
        ("{x: 2}", "input_shapes.x: expected a list of dims, got 2"),
        # YAML reads `1:` as a number: an input named "1" is written "1": [...].
        ("{1: [2, 4]}", "input_shapes: key 1 is not text"),
    ],
)
def test_input_shape_dims_are_yaml_integers_checked_as_the_cli_checks_them(
    tmp_path: Path, capsys, text: str, message: str
) -> None:
    code, err = _cli_error(tmp_path, capsys, f"input_shapes: {text}\n")
    assert code == 2 and err.count("\n") == 0 and "internal error" not in err
    assert err.startswith(f"graphopt: error: {tmp_path / 'recipe.yaml'}: ") and message in err


def test_input_shapes_from_a_recipe_still_bind() -> None:
    assert recipe_from_dict({"input_shapes": {"x": [2, 4], "1": []}}).input_shapes == {
        "x": (2, 4),
        "1": (),
    }


def test_keys_of_mixed_types_are_refused_not_a_crash(tmp_path: Path, capsys) -> None:
    # Before: exit 3, "TypeError: '<' not supported between instances of 'str' and 'int'"
    # from sorting the unknown keys.
    code, err = _cli_error(tmp_path, capsys, "verfy: true\n1: 2\n")
    assert code == 2 and err.endswith(
        "recipe.yaml: key 1 is not text (YAML read an integer); quote it"
    )
    with pytest.raises(UserInputError, match=r"recipe: key true is not text \(YAML read a bool"):
        recipe_from_dict({"verfy": True, True: 2})
    with pytest.raises(UserInputError, match=r"lossy\[0\].options: key 1 is not text"):
        recipe_from_dict({"lossy": [{"name": "test-lossy", "options": {1: 2}}]})


def _alias_bomb(levels: int) -> str:
    """A recipe whose `skip` holds one alias of ``levels`` nested levels of ten aliases each:
    a few hundred bytes that expand to 10**levels values."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"tolerance: [{', '.join(anchors)}]\nskip: [*a{levels - 1}]\n"


@pytest.mark.parametrize("levels", [6, 8, 30])
def test_alias_bombs_are_refused_before_anything_prints_them(
    tmp_path: Path, capsys, levels: int
) -> None:
    import time

    text = _alias_bomb(levels)
    assert len(text) < 2500
    start = time.perf_counter()
    code, err = _cli_error(tmp_path, capsys, text)
    # Before: 6 levels printed a 7.2 MB "one-line" error (175 MB of memory); 8 needed ~38 GB.
    assert code == 2 and err.count("\n") == 0 and len(err) < 300
    assert "expands to more than 10000 values" in err
    assert time.perf_counter() - start < 10


def test_a_recipe_that_contains_itself_is_refused(tmp_path: Path, capsys) -> None:
    code, err = _cli_error(tmp_path, capsys, "skip: &s [*s]\n")
    assert code == 2 and err.endswith(
        "recipe.yaml: a value contains itself (a YAML alias of its anchor)"
    )


def test_a_realistic_recipe_is_far_below_the_expansion_cap() -> None:
    shapes = {f"in{i}": [1, 3, 224, 224] for i in range(100)}
    assert len(recipe_from_dict({"input_shapes": shapes, "skip": ["cse"] * 50}).skip) == 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # A value shared by aliases prints once per use: messages quote values capped.
        ({"skip": [["x"] * 1000]}, r"skip\[0\]: expected a pass name, got \['x', 'x', "),
        ({"passes": [{"name": ["x"] * 1000}]}, r"passes\[0\].name: expected a pass name, got "),
        ({"skip": ["n" * 100_000]}, r"skip\[0\]: unknown pass 'nnnn"),
        ({"lossy": [{"name": "test-lossy", "options": {"k" * 100_000: 1}}]}, "has no option"),
        ({"version": 10**5000}, "recipe version an integer of 16610 bits is not supported"),
        ({"tolerance": "x" * 100_000}, "tolerance must be a number, got 'xxx"),
    ],
)
def test_values_quoted_in_messages_are_capped(data, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as caught:
        recipe_from_dict(data)
    assert len(str(caught.value)) < 320 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("verify: false\nverify: true\n", "key 'verify' given twice (lines 1 and 2)"),
        (
            "lossy:\n  - name: test-lossy\n    options: {ratio: 0.3, ratio: 0.4}\n",
            "key 'ratio' given twice (line 3)",
        ),
        ("input_shapes:\n  x: [1, 4]\n  x: [2, 4]\n", "key 'x' given twice (lines 2 and 3)"),
    ],
)
def test_duplicate_keys_are_refused_with_name_and_line(
    tmp_path: Path, capsys, text: str, message: str
) -> None:
    # Before: the last one won without a word.
    code, err = _cli_error(tmp_path, capsys, text)
    assert (
        code == 2 and err.count("\n") == 0 and err.endswith(f"recipe.yaml: {message}; give it once")
    )


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    text = "lossy:\n  - name: test-lossy\n    options:\n      <<: {ratio: 0.3}\n      ratio: 0.4\n"
    assert load_recipe(write(tmp_path, text)).lossy == [PassSpec("test-lossy", {"ratio": 0.4})]


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['echo unsafe']\n",
        "verify: !!python/name:os.system\n",
        "skip: [!!python/object/new:list []]\n",
    ],
)
def test_the_duplicate_checking_loader_is_still_safe(tmp_path: Path, text: str) -> None:
    with pytest.raises(UserInputError, match=r"not valid YAML \(could not determine a constructor"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "null\n", "~\n", "---\n"])
def test_nothing_is_the_empty_recipe(tmp_path: Path, text: str) -> None:
    options = load_recipe(write(tmp_path, text))
    assert options.passes is None and options.verify and options.lossy == []


@pytest.mark.parametrize(
    ("text", "kind"),
    [("0\n", "an integer"), ("false\n", "a bool"), ("[]\n", "a list"), ("- a\n", "a list")],
)
def test_anything_else_that_is_not_a_mapping_is_refused(
    tmp_path: Path, text: str, kind: str
) -> None:
    # Before: 0, false and [] were the empty recipe while `- a` was refused.
    with pytest.raises(
        UserInputError, match=f"a recipe is a mapping of keys .see the schema., not {kind}$"
    ):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, "version must be an integer, got 1.0"),
        (True, "version must be an integer, got true"),
        ("1", "version must be an integer, got '1'"),
        (2, "recipe version 2 is not supported"),
    ],
)
def test_version_is_the_integer_1(value, message: str) -> None:
    with pytest.raises(UserInputError, match=f"recipe: {message}$"):
        recipe_from_dict({"version": value})
    assert recipe_from_dict({"version": 1}).verify


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # YAML types are checked before any conversion could hide them: true is not 1.0.
        ({"tolerance": True}, "tolerance must be a number, got true"),
        ({"tolerance": [1]}, r"tolerance must be a number, got \[1\]"),
        ({"fold_limit": True}, "fold_limit must be bytes like 1MB, 512KB, 1000 or none, got true"),
        ({"fold_limit": 2.5}, "fold_limit must be bytes like 1MB, 512KB, 1000 or none, got 2.5"),
        ({"fold_limit": -1}, "fold_limit: size -1 must be non-negative"),
        ({"seed": 1.0}, "seed must be an integer, got 1.0"),
        ({"opset": True}, "opset must be an integer, got true"),
        ({"target": ["ort"]}, r"target must be one of portable, ort, tensorrt, got \['ort'\]"),
        ({"skip": [1]}, r"skip\[0\]: expected a pass name, got 1"),
        ({"skip": "cse"}, "skip must be a list, got 'cse'"),
    ],
)
def test_settings_of_the_wrong_yaml_type_are_refused(data, message: str) -> None:
    with pytest.raises(UserInputError, match=f"^recipe: {message}$"):
        recipe_from_dict(data)


def test_numbers_as_yaml_writes_them_are_accepted() -> None:
    # YAML 1.1 reads 1e-4 (no dot) as text; it is a number to the user, as in pass options.
    assert recipe_from_dict({"tolerance": "1e-4"}).tolerance == 1e-4
    assert recipe_from_dict({"tolerance": 1}).tolerance == 1.0
    assert recipe_from_dict({"fold_limit": 1000}).fold_limit_bytes == 1000
    assert recipe_from_dict({"fold_limit": "1.5KB"}).fold_limit_bytes == 1536


def test_a_folder_or_a_fifo_is_not_a_missing_recipe(tmp_path: Path) -> None:
    import os

    folder = tmp_path / "r.yaml"
    folder.mkdir()
    with pytest.raises(UserInputError, match=r"r.yaml: is a folder, not a recipe file$"):
        load_recipe(folder)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        # Refused before opening it: opening a FIFO blocks until a writer comes.
        with pytest.raises(UserInputError, match=r"fifo.yaml: not a regular file"):
            load_recipe(fifo)
    with pytest.raises(UserInputError, match=r"missing.yaml: recipe not found$"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_past_the_loaders_limits_is_bad_input(tmp_path: Path) -> None:
    # Before: RecursionError and ValueError (Python's int digit limit), exit 3.
    with pytest.raises(UserInputError, match=r"not valid YAML \(nested too deeply\)"):
        load_recipe(write(tmp_path, "skip: " + "[" * 5000 + "]" * 5000 + "\n"))
    with pytest.raises(UserInputError, match=r"not valid YAML \(Exceeds the limit"):
        load_recipe(write(tmp_path, "seed: " + "1" * 5000 + "\n"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # Messages from shared code (the registry, size parsing) get the recipe's key.
        ({"skip": ["nope"]}, r"skip\[0\]: unknown pass 'nope'"),
        ({"passes": ["dead-code", "nope"]}, r"passes\[1\]: unknown pass 'nope'"),
        ({"lossy": [{"name": "nope"}]}, r"lossy\[0\].name: unknown pass 'nope'"),
        (
            {"lossy": [{"name": "test-lossy", "options": {"ratio": "x"}}]},
            r"lossy\[0\].options: pass 'test-lossy' option 'ratio': expected a finite number",
        ),
        ({"fold_limit": "lots"}, "fold_limit: size 'lots': expected bytes like"),
        ({"passes": [{"name": "dead-code", "x": 1}]}, r"passes\[0\]: a pass entry is a name"),
    ],
)
def test_errors_name_the_recipe_and_the_key(data, message: str) -> None:
    with pytest.raises(UserInputError, match=f"^r.yaml: {message}"):
        recipe_from_dict(data, "r.yaml")


# ---- flags beside a recipe override its lossy options one by one --------------------------

PRUNE_RECIPE = (
    "lossy:\n  - name: prune\n    options: {flops: 0.25, criterion: l1, allocation: global}\n"
)


def test_a_pass_flag_overrides_only_the_options_it_sets() -> None:
    options = load_recipe_text(PRUNE_RECIPE)
    options.flags["prune"] = "flops=0.5"
    # Before: the flag replaced the whole entry: criterion l2 (default), allocation uniform.
    (spec,) = options.lossy_specs()
    assert spec.options == {"verify": True, "flops": 0.5, "criterion": "l1", "allocation": "global"}
    # Another target replaces the recipe's (one target: flops or params), option flags win.
    options.flags.update(prune="params=0.4", criterion="l2")
    (spec,) = options.lossy_specs()
    assert spec.options == {
        "verify": True,
        "params": 0.4,
        "criterion": "l2",
        "allocation": "global",
    }


def test_flags_of_other_lossy_passes_merge_option_by_option() -> None:
    options = recipe_from_dict(
        {"lossy": [{"name": "quantize", "options": {"mode": "int8", "per_channel": False}}]}
    )
    options.flags["quantize"] = "fp16"
    assert options.lossy_specs() == [PassSpec("quantize", {"mode": "fp16", "per_channel": False})]
    # A flag for a pass the recipe does not run adds its entry, as without a recipe, in the
    # order the passes run (prune before quantize).
    options.flags["prune"] = "flops=0.3"
    assert [s.name for s in options.lossy_specs()] == ["prune", "quantize"]


def test_the_api_keeps_a_pass_flag_replacing_its_own_lossy_entry() -> None:
    from graphopt.api import OptimizeOptions

    options = OptimizeOptions(
        lossy=[PassSpec("prune", {"flops": 0.25, "criterion": "l1"})], prune="flops=0.5"
    )
    (spec,) = options.lossy_specs()
    assert spec.options == {"verify": True, "flops": 0.5}


def test_prune_flag_beside_a_recipe_keeps_its_criterion_and_allocation(
    tmp_path: Path, capsys
) -> None:
    model, recipe = _pruning_recipe(tmp_path, PRUNE_RECIPE)
    code = main(["optimize", str(model), "--recipe", str(recipe), "--prune", "flops=0.3"])
    text = " ".join(capsys.readouterr().out.split())
    # Before: "prune: criterion l2 (default), ... allocation uniform (default)".
    assert code == 0 and "prune: criterion l1, " in text and "allocation global;" in text
    assert "pruning flops=0.3:" in text


def load_recipe_text(text: str):
    return recipe_from_dict(yaml.safe_load(text), "r.yaml")


def test_a_pass_flag_replaces_the_target_of_the_recipes_listed_entry() -> None:
    options = recipe_from_dict(
        {"passes": ["dead-code", {"name": "prune", "options": {"flops": 0.25, "criterion": "l1"}}]}
    )
    options.flags["prune"] = "params=0.5"
    steps, _ = options.pipeline()
    # Before: flops 0.25 and params 0.5 both reached the pass ("give exactly one target").
    assert steps[-1].passes[0].options == {"verify": True, "criterion": "l1", "params": 0.5}
    assert options.passes[1].options == {"flops": 0.25, "criterion": "l1"}  # left as read


def test_choices_take_any_case_through_every_door(tmp_path: Path) -> None:
    """``--quantize INT8`` and ``OptimizeOptions(quantize="INT8")`` were accepted, a recipe's
    ``mode: INT8`` and ``PassSpec("quantize", {"mode": "INT8"})`` refused: all accept now,
    and all record the declared spelling."""
    from graphopt.api import OptimizeOptions
    from graphopt.cli import build_parser
    from graphopt.option_checks import validate_options

    recipe = recipe_from_dict(
        {"lossy": [{"name": "quantize", "options": {"mode": "INT8", "calib_method": "MinMax"}}]}
    )
    assert recipe.lossy == [PassSpec("quantize", {"mode": "int8", "calib_method": "minmax"})]
    api = validate_options(OptimizeOptions(lossy=[PassSpec("quantize", {"mode": " Int8 "})]))
    assert api.lossy == [PassSpec("quantize", {"mode": "int8"})]
    args = build_parser().parse_args(["optimize", "m.onnx", "--prune", "flops=0.3",
                                      "--criterion", "L1"])  # fmt: skip
    assert args.lossy__criterion == "l1"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        # Before: "--decompose 'flops=2.0': ..." (a flag the user never typed) at run time.
        (
            {"name": "decompose", "options": {"flops": 2}},
            r"^r: lossy\[0\]\.options\.flops: 2\.0: expected flops=R .* 0 < R < 1$",
        ),
        # Before: "give exactly one target", with one target given, out of range.
        ({"name": "erase-blocks", "options": {"count": -1}}, r"^r: lossy\[0\]\.options\.count: -1"),
        # flops: 0 too ("give exactly one target"); 2.0 said [0, 1], which holds 0 and 1.
        (
            {"name": "prune", "options": {"flops": 0}},
            r"option 'flops': expected a number in \(0, 1\), got 0$",
        ),
        (
            {"name": "prune", "options": {"params": 1.0}},
            r"option 'params': expected a number in \(0, 1\), got 1\.0$",
        ),
        (
            {"name": "erase-blocks", "options": {"flops": 1.5}},
            r"^r: lossy\[0\]\.options\.flops: 1\.5: R must be in \(0, 1\)",
        ),
        # Before: "expected a string, got False" / "got 124", without the YAML rule.
        (
            {"name": "factorize", "options": {"rule": "flops=0.3", "speed_check": False}},
            r"option 'speed_check': expected a string, got false \(YAML reads unquoted yes/no",
        ),
        (
            {"name": "sparsify", "options": {"pattern": 124}},
            r"option 'pattern': .*got 124 \(YAML 1\.1 reads an unquoted N:M as a base-60 number",
        ),
    ],
)
def test_lossy_entry_errors_name_the_key_and_the_reason(entry: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as caught:
        recipe_from_dict({"lossy": [entry]}, "r")
    assert "\n" not in str(caught.value)


def test_a_missing_recipe_file_says_where_it_was_looked_for(tmp_path: Path, monkeypatch) -> None:
    """Paths in a recipe are relative to the working directory; "no such calibration file"
    at run time did not say so, nor which key named it."""
    monkeypatch.chdir(tmp_path)
    for data, key in (
        ({"lossy": [{"name": "prune", "options": {"flops": 0.3, "calib": "c.npz"}}]},
         r"lossy\[0\]\.options\.calib"),
        ({"verify_inputs": "c.npz"}, "verify_inputs"),
    ):  # fmt: skip
        with pytest.raises(UserInputError, match=rf"^r: {key}: no such file 'c\.npz' \(a "
                           r"recipe's paths are relative to the working directory"):  # fmt: skip
            recipe_from_dict(data, "r")
    (tmp_path / "c.npz").write_bytes(b"")
    assert recipe_from_dict({"verify_inputs": "c.npz"}, "r").verify_inputs == "c.npz"


def test_lossy_entries_are_recorded_in_the_order_they_run(tmp_path: Path) -> None:
    """Before: ``lossy: [quantize, prune]`` ran prune first but recorded the list's order in
    graphopt.options, so the file's bytes differed from the flags' for the same run."""
    from graphopt_tests.passes.pruning.graphs import cnn

    source = tmp_path / "cnn.onnx"
    ir.save(cnn(), source)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "lossy:\n  - {name: quantize, options: {mode: fp16}}\n"
        "  - {name: prune, options: {flops: 0.3}}\n"
    )
    by_flags, by_recipe = tmp_path / "flags.onnx", tmp_path / "recipe.onnx"
    common = ["--no-verify"]
    args = ["--prune", "flops=0.3", "--quantize", "fp16"]
    assert main(["optimize", str(source), "-o", str(by_flags), *args, *common]) == 0
    assert (
        main(["optimize", str(source), "-o", str(by_recipe), "--recipe", str(recipe), *common]) == 0
    )
    assert by_recipe.read_bytes() == by_flags.read_bytes()
