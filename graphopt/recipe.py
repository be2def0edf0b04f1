"""Recipe files: an ordered pipeline and its settings in YAML.

Schema (every key optional; unknown keys are an error)::

    version: 1                 # recipe schema version; only 1 exists
    passes:                    # ordered; omitted = the default exact pipeline
      - dead-code              # a pass by name
      - name: constant-folding # or a pass with options
        options: {}
    skip: [cse]                # passes left out of the default pipeline
    lossy:                     # lossy passes added to the default pipeline
      - name: prune            # criterion/compensation/allocation left out: the defaults
        options: {flops: 0.3}  # for calib (a file: reconstruction/lsq/global; else l2)
    verify: true
    tolerance: 1.0e-4          # max error relative to each output's largest magnitude
    fold_limit: 1MB            # bytes, with KB/MB/GB suffix, or "none"
    input_shapes:              # bind symbolic input dims for verification and FLOPs
      input: [1, 3, 224, 224]
    verify_inputs: data.npz    # verify on this data: one array per model input
    external_data: null        # true / false / null (automatic past 2 GB)
    target: portable           # portable | ort | tensorrt
    opset: null                # raise the default-domain opset first (e.g. 17, 20, 23)

Command-line flags given next to ``--recipe`` override the recipe's settings. Pass options
are converted to the types the pass declares (``"false"`` → False, ``"16"`` → 16); a value of
the wrong type is an error naming the pass and the option. With ``passes:``, a pass in
``lossy:`` must be in the list too (its options are merged into that entry).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.pipeline import PassSpec
from graphopt.registry import get_pass

RECIPE_KEYS = {
    "version",
    "passes",
    "skip",
    "lossy",
    "verify",
    "tolerance",
    "seed",
    "fold_limit",
    "input_shapes",
    "verify_inputs",
    "external_data",
    "target",
    "opset",
}
TARGETS = ("portable", "ort", "tensorrt")


def parse_size(text: str | int | None) -> int | None:
    """``1MB`` → 1048576; ``none`` → None (no limit)."""
    if text is None:
        return None
    if isinstance(text, int):
        if text < 0:
            raise UserInputError(f"size {text} must be non-negative")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", str(text).lower())
    if str(text).strip().lower() == "none":
        return None
    if not match:
        raise UserInputError(f"size {text!r}: expected bytes like 1MB, 512KB, 1000 or none")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get((match.group(2) or "b")[0], 1)
    return int(float(match.group(1)) * scale)


def load_recipe(path: str | Path) -> OptimizeOptions:
    """Read a recipe file into options (validated: names, types, keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{path}: not valid YAML ({first})") from None
    return recipe_from_dict(data or {}, str(path))


def recipe_from_dict(data: Any, name: str = "recipe") -> OptimizeOptions:
    if not isinstance(data, dict):
        raise UserInputError(f"{name}: a recipe is a mapping of keys (see the schema)")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise UserInputError(f"{name}: unknown key(s) {sorted(unknown)}")
    if data.get("version", 1) != 1:
        raise UserInputError(f"{name}: recipe version {data['version']!r} is not supported")
    options = OptimizeOptions()
    if "passes" in data:
        options.passes = [_pass_spec(entry, name) for entry in _list(data, "passes", name)]
    options.skip = [str(s) for s in _list(data, "skip", name)]
    for skipped in options.skip:
        get_pass(skipped)
    options.lossy = [_pass_spec(entry, name) for entry in _list(data, "lossy", name)]
    if "verify" in data:
        options.verify = _bool(data["verify"], "verify", name)
    if "tolerance" in data:
        try:
            options.tolerance = float(data["tolerance"])
        except (TypeError, ValueError):
            raise UserInputError(f"{name}: tolerance must be a number") from None
    if "seed" in data:
        # The seed of generated inputs decides which passes verification rolls back: a
        # recipe can pin it, as the output's recorded options do.
        if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
            raise UserInputError(f"{name}: seed must be an integer")
        options.seed = data["seed"]
    if "fold_limit" in data:
        options.fold_limit_bytes = parse_size(data["fold_limit"])
    if "input_shapes" in data:
        shapes = data["input_shapes"]
        if not isinstance(shapes, dict):
            raise UserInputError(f"{name}: input_shapes maps input names to lists of dims")
        try:
            options.input_shapes = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
        except (TypeError, ValueError):
            raise UserInputError(f"{name}: input_shapes dims must be integers") from None
    if data.get("verify_inputs") is not None:
        if not isinstance(data["verify_inputs"], str):
            raise UserInputError(f"{name}: verify_inputs is the path of an .npz file")
        options.verify_inputs = data["verify_inputs"]
    if data.get("external_data") is not None:
        options.external_data = _bool(data["external_data"], "external_data", name)
    if data.get("opset") is not None:
        if not isinstance(data["opset"], int) or isinstance(data["opset"], bool):
            raise UserInputError(f"{name}: opset must be an integer")
        options.opset = data["opset"]
    if "target" in data:
        if data["target"] not in TARGETS:
            raise UserInputError(f"{name}: target must be one of {', '.join(TARGETS)}")
        options.target = data["target"]
    return options


def _list(data: dict, key: str, name: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise UserInputError(f"{name}: {key} must be a list")
    return value


def _bool(value: Any, key: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"{name}: {key} must be true or false")
    return value


def _pass_spec(entry: Any, name: str) -> PassSpec:
    if isinstance(entry, str):
        get_pass(entry)
        return PassSpec(entry)
    if isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "options"}:
        cls = get_pass(str(entry["name"]))
        opts = entry.get("options") or {}
        if not isinstance(opts, dict):
            raise UserInputError(f"{name}: options of pass {entry['name']!r} must be a mapping")
        try:
            # Converted to the declared types here, so that a quoted "false" is False and a
            # wrong type stops the run before anything is loaded; only the options the recipe
            # gives are kept (the pass's own defaults fill the rest, for every caller alike).
            checked = cls.check_options({str(k): v for k, v in opts.items()})
        except UserInputError as exc:
            raise UserInputError(f"{name}: {exc}") from None
        return PassSpec(cls.name, {k: checked[k] for k in map(str, opts)})
    raise UserInputError(f"{name}: a pass entry is a name or {{name: ..., options: {{...}}}}")
