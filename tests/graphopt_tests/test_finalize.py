"""The output's record of its options (``graphopt.finalize``): every door (CLI flags, recipe,
API keywords, ``PassSpec``) that runs the same thing records the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt import finalize
from graphopt.api import OptimizeOptions
from graphopt.cli import main
from graphopt.option_checks import validate_options
from graphopt.pipeline import PassSpec
from graphopt.recipe import recipe_from_dict
from graphopt_tests.passes.pruning.graphs import cnn, correlated


def _record(options: OptimizeOptions) -> dict:
    """The record ``optimize`` would stamp for ``options`` (checked as ``optimize`` does)."""
    return finalize.options_record(validate_options(options))


def _calib(folder: Path, name: str = "calib.npz") -> Path:
    rng = np.random.default_rng(0)
    with (folder / name).open("wb") as handle:  # a path would get ".npz" added
        np.savez(handle, x=correlated(rng, (16, 3, 8, 8)))
    return folder / name


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_a_calib_path_object_is_recorded_by_name_and_digest(tmp_path: Path) -> None:
    """A pathlib.Path was recorded as "PosixPath('/abs/...')" without its digest: a record
    that differs from the CLI's and that options_from_metadata cannot replay."""
    calib = _calib(tmp_path)
    by_text = _record(OptimizeOptions(prune="flops=0.3", calib=str(calib)))
    assert _record(OptimizeOptions(prune="flops=0.3", calib=calib)) == by_text
    spec = PassSpec("prune", {"flops": 0.3, "calib": calib})
    assert _record(OptimizeOptions(lossy=[spec])) == by_text
    assert by_text["lossy"][0]["options"]["calib"] == "calib.npz"
    assert by_text["calib_sha256"] == finalize._sha256(calib)


@pytest.mark.parametrize(
    ("keyword", "given", "recorded"),
    [
        ("block_size", "64", 64),
        ("block_size", 64.0, 64),
        ("round_to", "2", 2),
    ],
)
def test_flag_values_are_recorded_as_converted(keyword: str, given, recorded) -> None:
    """OptimizeOptions(block_size="64") ran as 64 and was recorded as "64": other bytes than
    the CLI's --block-size 64 for the same model."""
    flags = {"quantize": "int4-weight"} if keyword == "block_size" else {"prune": "flops=0.3"}
    record = _record(OptimizeOptions(target="ort", **flags, **{keyword: given}))
    assert record["lossy"][0]["options"][keyword] == recorded
    assert type(record["lossy"][0]["options"][keyword]) is type(recorded)


def test_a_bool_flag_given_as_text_is_recorded_as_a_bool() -> None:
    record = _record(OptimizeOptions(quantize="int8", calib="random", equalize="no"))
    assert record["lossy"][0]["options"]["equalize"] is False


def test_an_inline_lossy_pass_is_recorded_as_the_cli_records_it() -> None:
    """``passes: [..., {name: prune, options: {...}}]`` ran the prune but recorded "lossy":
    [], so a later run gave no "already through --prune" warning nor history."""
    names = ["dead-code", "prune", "constant-folding"]
    cli = _record(OptimizeOptions(passes=names, prune="flops=0.3"))
    inline = [PassSpec("dead-code"), PassSpec("prune", {"flops": 0.3}), "constant-folding"]
    assert _record(OptimizeOptions(passes=inline)) == cli
    recipe = recipe_from_dict(
        {"passes": ["dead-code", {"name": "prune", "options": {"flops": 0.3}}, "constant-folding"]}
    )
    assert _record(recipe) == cli
    assert [entry["name"] for entry in cli["lossy"]] == ["prune"]


def test_an_inline_lossy_pass_is_warned_about_on_a_rerun(tmp_path: Path) -> None:
    source, first = tmp_path / "cnn.onnx", tmp_path / "a.onnx"
    ir.save(cnn(), source)
    inline = ["dead-code", PassSpec("prune", {"flops": 0.3}), "constant-folding"]
    graphopt.optimize(source, first, OptimizeOptions(passes=inline))
    lossy = json.loads(_props(first)[finalize.OPTIONS_KEY])["lossy"]
    assert [entry["name"] for entry in lossy] == ["prune"]
    result = graphopt.optimize(first, tmp_path / "b.onnx", OptimizeOptions(prune="flops=0.2"))
    assert [n for n in result.report.notes if "already through --prune" in n]
    history = json.loads(_props(tmp_path / "b.onnx")[finalize.HISTORY_KEY])
    assert history[0]["lossy"] == lossy


def test_an_inline_lossy_pass_gives_the_cli_s_bytes(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "cnn.onnx"
    ir.save(cnn(), source)
    monkeypatch.chdir(tmp_path)
    main(["optimize", "cnn.onnx", "-o", "cli.onnx", "--passes", "dead-code,prune",
          "--prune", "flops=0.3"])  # fmt: skip
    inline = ["dead-code", PassSpec("prune", {"flops": 0.3})]
    graphopt.optimize(source, tmp_path / "api.onnx", OptimizeOptions(passes=inline))
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()


def test_requantize_records_its_mode_from_every_door() -> None:
    """A recipe's ``lossy: [requantize]`` recorded {} where the CLI recorded the mode."""
    cli = _record(OptimizeOptions(requantize="symmetric"))
    assert cli["lossy"] == [{"name": "requantize", "options": {"mode": "symmetric"}}]
    assert _record(recipe_from_dict({"lossy": ["requantize"]})) == cli


def test_a_calib_file_named_random_is_recorded_as_a_file(tmp_path: Path) -> None:
    """``--calib ./random`` reads a file, but was recorded as "random": a replay generated
    data instead."""
    calib = _calib(tmp_path, "random")
    record = _record(OptimizeOptions(prune="flops=0.3", calib=str(calib)))
    assert record["lossy"][0]["options"]["calib"] == "./random"
    assert record["calib_sha256"] == finalize._sha256(calib)
