"""A lossy pass declares its options once: the CLI flags, the API fields and recipe keys
follow from that declaration (a new pass needs no change in cli.py, api.py or recipe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir
import pytest

from graphopt import api
from graphopt.cli import build_parser, main
from graphopt.errors import UserInputError
from graphopt.recipe import load_recipe
from graphopt.registry import GraphPass, PassOption, Stage
from graphopt_tests.helpers import register_for_test
from graphopt_tests.test_cli import model_file

SEEN: list[dict[str, Any]] = []


class SquashPass(GraphPass):
    """Test only: a lossy pass that records the options it was built with."""

    name = "test-squash"
    exact = False
    stage = Stage.QUANTIZE
    flag = "--test-squash"
    flag_metavar = "bits=N"
    flag_help = "squash (test only)"
    options: ClassVar[tuple[PassOption, ...]] = (
        PassOption("bits", int, 8, "bits kept"),
        PassOption("level", int, 1, "how hard", flag="--squash-level", metavar="N"),
        PassOption("mode", str, "fast", "how", flag="--squash-mode", choices=("fast", "slow")),
        PassOption("hidden", float, 0.5, "recipe/API only"),
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        key, _, value = text.partition("=")
        return {key: int(value)}

    def rewrite(self, model: ir.Model) -> int:
        SEEN.append(dict(self.settings))
        return 0


@pytest.fixture(autouse=True)
def _squash(monkeypatch):
    register_for_test(monkeypatch, SquashPass)
    SEEN.clear()


def test_cli_flags_come_from_the_declaration(tmp_path: Path) -> None:
    help_text = build_parser().format_help() + _optimize_help()
    for flag in ("--test-squash", "--squash-level", "--squash-mode"):
        assert flag in help_text
    assert "--hidden" not in help_text  # an option without a flag stays recipe/API only
    path = model_file(tmp_path)
    args = ["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--no-verify"]
    assert main([*args, "--test-squash", "bits=4", "--squash-level", "3"]) == 0
    assert SEEN[-1] == {"bits": 4, "level": 3, "mode": "fast", "hidden": 0.5}


def test_cli_validates_declared_choices_and_needs_the_pass_flag(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    args = ["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--no-verify"]
    assert main([*args, "--test-squash", "bits=4", "--squash-mode", "odd"]) == 2
    assert main([*args, "--squash-level", "3"]) == 2
    err = capsys.readouterr().err
    assert "--squash-level only applies with --test-squash" in err
    assert SEEN == []


def test_recipe_keys_come_from_the_declaration(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lossy:\n  - name: test-squash\n    options: {bits: 2, hidden: '0.25'}\n")
    options = load_recipe(str(recipe))
    api.optimize(model_file(tmp_path), None, _no_verify(options))
    assert SEEN[-1]["bits"] == 2 and SEEN[-1]["hidden"] == 0.25
    recipe.write_text("lossy:\n  - name: test-squash\n    options: {nope: 1}\n")
    with pytest.raises(Exception, match="nope"):
        api.optimize(model_file(tmp_path), None, _no_verify(load_recipe(str(recipe))))


def test_api_keywords_follow_the_declared_flags(tmp_path: Path) -> None:
    # Every flag of a lossy pass is an API keyword (the flag as a Python name), with nothing
    # written for it in api.py: a new pass's flags are API keywords at once.
    options = api.OptimizeOptions(prune="flops=0.3", criterion="l1", round_to=4, verify=False)
    (spec,) = options.lossy_specs()
    assert spec.name == "prune" and options.prune == "flops=0.3"
    assert spec.options["flops"] == 0.3 and spec.options["criterion"] == "l1"
    assert spec.options["round_to"] == 4 and "allocation" not in spec.options
    squash = api.OptimizeOptions(test_squash="bits=3", squash_level=2, verify=False)
    assert squash.squash_mode is None  # a declared flag not given reads as "not set"
    api.optimize(model_file(tmp_path), None, squash)
    assert SEEN[-1] == {"bits": 3, "level": 2, "mode": "fast", "hidden": 0.5}
    with pytest.raises(AttributeError, match="no field or pass flag 'squash_levels'"):
        _ = squash.squash_levels
    typo = api.OptimizeOptions(test_squash="bits=3", squash_levels=2, verify=False)
    with pytest.raises(UserInputError, match=r"unknown option.*'squash_levels'"):
        api.optimize(model_file(tmp_path), None, typo)
    alone = api.OptimizeOptions(squash_level=2, verify=False)
    with pytest.raises(UserInputError, match="--squash-level only applies with --test-squash"):
        api.optimize(model_file(tmp_path), None, alone)


def test_an_option_flag_two_passes_declare_sets_both(monkeypatch, tmp_path: Path) -> None:
    class OtherPass(SquashPass):
        """Test only: a second lossy pass sharing the level flag."""

        name = "test-other"
        flag = "--test-other"

    register_for_test(monkeypatch, OtherPass)
    help_text = _optimize_help()
    assert help_text.count("[--squash-level N]") == 1  # one argument, not a clash
    args = ["optimize", str(model_file(tmp_path)), "-o", str(tmp_path / "o.onnx"), "--no-verify"]
    assert (
        main([*args, "--test-squash", "bits=1", "--test-other", "bits=2", "--squash-level", "5"])
        == 0
    )
    assert sorted((s["bits"], s["level"]) for s in SEEN) == [(1, 5), (2, 5)]


def _optimize_help() -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["optimize"].format_help()


def _no_verify(options: api.OptimizeOptions) -> api.OptimizeOptions:
    options.verify = False
    return options
