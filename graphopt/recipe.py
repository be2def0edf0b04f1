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

An empty file (or one with only comments, or ``null``) is the empty recipe: the defaults.
Anything else must be a mapping with text keys, each given once.

Command-line flags given next to ``--recipe`` override the recipe's settings; a lossy pass's
flags override only the options they set in the recipe's entry for that pass
(:class:`RecipeOptions`). Pass options are converted to the types the pass declares
(``"false"`` → False, ``"16"`` → 16); a value of the wrong type is an error naming the pass
and the option. With ``passes:``, a pass in ``lossy:`` must be in the list too (its options
are merged into that entry).

Settings are checked for their YAML *type* here (``true`` is not the number 1, ``"2316"`` is
not a list of dims, ``2.7`` is not a dim), before any conversion could hide the mistake; the
ranges of the values are the API's to check, for every caller alike. Errors name the recipe
file and the key (``r.yaml: lossy[0].options: ...``) and quote a value on one short line.
"""

from __future__ import annotations

import dataclasses
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.input_dims import parse_input_shapes
from graphopt.io import os_error_reason
from graphopt.option_checks import TARGETS
from graphopt.pipeline import PassSpec, Step
from graphopt.registry import GraphPass, capped, flag_key, get_pass, shown_value

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
# The most values (mappings, lists and scalars, each alias counted as what it repeats) a
# recipe may expand to. A real recipe has tens; YAML aliases nested ten wide and eight deep
# ("billion laughs") load as a few shared objects but print as gigabytes.
MAX_RECIPE_VALUES = 10_000
# Characters of a user's value quoted in an error message (messages are one line).
SHOWN_CHARS = 80
# Characters of a message from shared code (pass lookup, option conversion) that quotes the
# recipe's text: a pass name or option key can be as long as the file.
SHARED_MESSAGE_CHARS = 240

_T = TypeVar("_T")


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


def load_recipe(path: str | Path) -> RecipeOptions:
    """Read a recipe file into options (validated: names, types, keys)."""
    path = Path(path)
    _check_recipe_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read the recipe ({os_error_reason(exc)})") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    try:
        data = _RecipeLoader.read(text)
    except UserInputError as exc:  # a duplicate key (_RecipeLoader)
        raise UserInputError(f"{path}: {exc}") from None
    except RecursionError:
        raise UserInputError(f"{path}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError) as exc:
        # ValueError: an integer past Python's 4300-digit conversion limit.
        raise UserInputError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    # Only "nothing" is the empty recipe: `0`, `false` or `[]` are not a mapping of settings.
    return recipe_from_dict({} if data is None else data, str(path))


def recipe_from_dict(data: Any, name: str = "recipe") -> RecipeOptions:
    """Options from a recipe's mapping (as read from YAML): checked key by key."""
    if not isinstance(data, dict):
        raise UserInputError(
            f"{name}: a recipe is a mapping of keys (see the schema), not {_kind(data)}"
        )
    # Before anything walks or prints a value: aliases make a small file a huge document.
    _check_expanded_size(data, name)
    _check_keys(data, name, "")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise UserInputError(f"{name}: unknown key(s) {_shown(unknown)}")
    if "version" in data:
        version = data["version"]
        if not _is_int(version):
            raise UserInputError(f"{name}: version must be an integer, got {_shown(version)}")
        if version != 1:
            raise UserInputError(f"{name}: recipe version {_shown(version)} is not supported")
    options = RecipeOptions()
    if "passes" in data:
        options.passes = [
            _pass_spec(entry, name, f"passes[{i}]")
            for i, entry in enumerate(_list(data, "passes", name))
        ]
    for i, skipped in enumerate(_list(data, "skip", name)):
        where = f"skip[{i}]"
        if not isinstance(skipped, str):
            raise UserInputError(f"{name}: {where}: expected a pass name, got {_shown(skipped)}")
        _shared(name, where, get_pass, skipped)
        options.skip.append(skipped)
    options.lossy = [
        _pass_spec(entry, name, f"lossy[{i}]") for i, entry in enumerate(_list(data, "lossy", name))
    ]
    if "verify" in data:
        options.verify = _bool(data["verify"], "verify", name)
    if "tolerance" in data:
        options.tolerance = _number(data["tolerance"], "tolerance", name)
    if "seed" in data:
        # The seed of generated inputs decides which passes verification rolls back: a
        # recipe can pin it, as the output's recorded options do.
        if not _is_int(data["seed"]):
            raise UserInputError(f"{name}: seed must be an integer, got {_shown(data['seed'])}")
        options.seed = data["seed"]
    if "fold_limit" in data:
        limit = data["fold_limit"]
        # parse_size reads text as the CLI's flag; a YAML float or bool would be truncated
        # or taken for a count of bytes (`true` = 1 byte).
        if limit is not None and not (_is_int(limit) or isinstance(limit, str)):
            raise UserInputError(
                f"{name}: fold_limit must be bytes like 1MB, 512KB, 1000 or none, "
                f"got {_shown(limit)}"
            )
        options.fold_limit_bytes = _shared(name, "fold_limit", parse_size, limit)
    if "input_shapes" in data:
        options.input_shapes = _input_shapes(data["input_shapes"], name)
    if data.get("verify_inputs") is not None:
        if not isinstance(data["verify_inputs"], str):
            raise UserInputError(f"{name}: verify_inputs is the path of an .npz file")
        _check_exists(data["verify_inputs"], name, "verify_inputs")
        options.verify_inputs = data["verify_inputs"]
    if data.get("external_data") is not None:
        options.external_data = _bool(data["external_data"], "external_data", name)
    if data.get("opset") is not None:
        if not _is_int(data["opset"]):
            raise UserInputError(f"{name}: opset must be an integer, got {_shown(data['opset'])}")
        options.opset = data["opset"]
    if "target" in data:
        if not isinstance(data["target"], str) or data["target"] not in TARGETS:
            raise UserInputError(
                f"{name}: target must be one of {', '.join(TARGETS)}, got {_shown(data['target'])}"
            )
        options.target = data["target"]
    return options


class RecipeOptions(OptimizeOptions):
    """The options a recipe gives: flags set beside it override its lossy-pass entries
    option by option.

    A pass's own flag (``--prune flops=0.5``, ``OptimizeOptions.flags["prune"]``) replaces
    the whole ``lossy`` entry of a plain :class:`OptimizeOptions`; next to a recipe it used to
    drop the recipe's ``criterion: l1, allocation: global`` as well, although flags override
    a recipe only where they say something. Here the flags' options win and the entry's other
    options stay, except the pass's other targets (:func:`_overlaid`): ``--prune params=0.5``
    beside ``flops: 0.25`` replaces the target, it does not add a second one. The same holds
    for the pass's entry in ``passes:``, which takes the asked options one by one.
    """

    def _asked_lossy(self) -> list[PassSpec]:
        recipe = {spec.name: spec.options for spec in self.lossy}
        merged = [
            PassSpec(spec.name, _overlaid(get_pass(spec.name), recipe[spec.name], spec.options))
            if spec.name in recipe and self._flag_given(spec.name)
            else spec
            for spec in super()._asked_lossy()
        ]
        # A replaced entry went to the end; keep the recipe's order (a refined one keeps it).
        order = {spec.name: i for i, spec in enumerate(self.lossy)}
        return sorted(merged, key=lambda spec: order.get(spec.name, len(order)))

    def pipeline(self) -> tuple[list[Step], list[str]]:
        if self.passes is None:
            return super().pipeline()
        # pipeline.explicit_specs lays the asked options over the list's entry one by one,
        # which keeps the entry's target beside the flag's (flops and params: refused).
        asked = {s.name: s.options for s in self._asked_lossy() if self._flag_given(s.name)}
        passes = [
            PassSpec(s.name, _overlaid(get_pass(s.name), s.options, asked[s.name]))
            if s.name in asked
            else s
            for s in self.passes
        ]
        return OptimizeOptions.pipeline(dataclasses.replace(self, passes=passes))

    def _flag_given(self, name: str) -> bool:
        """Whether the flags ask for pass ``name`` by its own flag (``--prune``)."""
        cls = get_pass(name)
        return cls.flag is not None and flag_key(cls.flag) in self.flags


def _overlaid(cls: type[GraphPass], given: dict[str, Any], flags: dict[str, Any]) -> dict:
    """``flags`` (the options the flags set; no defaults filled in) over ``given`` (a recipe
    entry's): one by one, except that a target the flags set replaces the entry's targets."""
    targets = _flag_targets(cls)
    if targets & set(flags):
        given = {k: v for k, v in given.items() if k not in targets}
    return {**given, **flags}


def _flag_targets(cls: type[GraphPass]) -> set[str]:
    """The options that say what a lossy pass's own flag says (prune's ``flops``/``params``,
    quantize's ``mode``): options without a flag of their own whose default means "not
    given" (0, empty). One of them given by the flag replaces the others."""
    return {
        o.name
        for o in cls.options
        if o.flag is None and o.type is not bool and o.default in (None, "", 0)
    }


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no ``!!python`` tags) that refuses a key given twice in one
    mapping: the last one used to win without a word (``verify: false`` then ``verify:
    true``, an option or an input shape listed twice)."""

    @classmethod
    def read(cls, text: str) -> Any:
        """The document in ``text``: what ``yaml.safe_load`` does, with this loader."""
        loader = cls(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            # `<<: *base` merges keys that this mapping may override: YAML's meaning, not a
            # repeat (the merged mapping's own keys were checked when it was built).
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the SafeLoader's own error says so
                continue
            if first is not None:
                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                raise UserInputError(f"key {_shown(key)} given twice ({lines}); give it once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_recipe_path(path: Path) -> None:
    """Not found, a folder, or not a regular file (a FIFO would block the read): one line."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserInputError(f"{path}: recipe not found") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read the recipe ({os_error_reason(exc)})") from None
    if stat.S_ISDIR(mode):
        raise UserInputError(f"{path}: is a folder, not a recipe file")
    if not stat.S_ISREG(mode):
        raise UserInputError(f"{path}: not a regular file (a recipe is a YAML file)")


def _check_expanded_size(data: Any, name: str) -> None:
    """Refuse a document that expands past MAX_RECIPE_VALUES values, or that contains itself.

    A value's size is 1 plus its children's, memoized by identity: YAML aliases share one
    object, so even an exponential expansion costs one visit per distinct object. Iterative,
    so a deeply nested document cannot exhaust Python's stack here.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # containers whose children are being measured: the path
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, measured = stack.pop()
        children = _children(value)
        if children is None:
            continue
        key = id(value)
        if measured:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[key] > MAX_RECIPE_VALUES:
                raise UserInputError(
                    f"{name}: the recipe expands to more than {MAX_RECIPE_VALUES} values "
                    "(YAML aliases repeat what their anchor holds); a recipe has tens"
                )
        elif key in open_:
            raise UserInputError(f"{name}: a value contains itself (a YAML alias of its anchor)")
        elif key not in sizes:
            open_.add(key)
            stack.append((value, True))
            stack.extend((child, False) for child in children)


def _children(value: Any) -> list | None:
    """The values inside a mapping (keys and values) or a list; None for a scalar."""
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set)):
        return list(value)
    return None


def _check_keys(mapping: dict, name: str, where: str) -> None:
    """Every key of ``mapping`` is text: YAML reads `1:` as a number and `yes:` as a bool,
    which no setting, option or input name is (quoted, ``"1":`` is text)."""
    for key in mapping:
        if not isinstance(key, str):
            at = f"{where}: " if where else ""
            raise UserInputError(
                f"{name}: {at}key {_shown(key)} is not text (YAML read {_kind(key)}); quote it"
            )


def _input_shapes(shapes: Any, name: str) -> dict[str, tuple[int, ...]]:
    """``{input: [dims]}`` checked for types here, then by the CLI's ``--input-shape`` parser
    (dims non-negative; the model's own checks come when it is loaded)."""
    if not isinstance(shapes, dict):
        raise UserInputError(f"{name}: input_shapes maps input names to lists of dims")
    _check_keys(shapes, name, "input_shapes")
    parsed: dict[str, tuple[int, ...]] = {}
    for input_name, dims in shapes.items():
        where = f"input_shapes.{input_name}"
        # A string is not a list of dims ("2316" read char by char was 2x3x1x6), nor is a
        # float a dim (2.7 was cut to 2), nor a bool (true was 1).
        if not isinstance(dims, list):
            raise UserInputError(
                f"{name}: {_shown_key(where)}: expected a list of dims, got {_shown(dims)}"
            )
        for dim in dims:
            if not _is_int(dim):
                raise UserInputError(
                    f"{name}: {_shown_key(where)}: dims must be integers, got {_shown(dim)}"
                )
        spec = f"{input_name}:{'x'.join(str(d) for d in dims)}"
        parsed.update(_shared(name, _shown_key(where), parse_input_shapes, [spec]))
    return parsed


def _list(data: dict, key: str, name: str) -> list:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserInputError(f"{name}: {key} must be a list, got {_shown(value)}")
    return value


def _bool(value: Any, key: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"{name}: {key} must be true or false, got {_shown(value)}")
    return value


def _number(value: Any, key: str, name: str) -> float:
    """A YAML number, or its text (YAML 1.1 reads ``1e-4`` without a dot as text); not a
    bool, which float() would take for 1.0."""
    if _is_int(value) or isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise UserInputError(f"{name}: {key} must be a number, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    """A YAML integer: Python's bool is an int, YAML's ``true`` is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _pass_spec(entry: Any, name: str, where: str) -> PassSpec:
    if isinstance(entry, str):
        _shared(name, where, get_pass, entry)
        return PassSpec(entry)
    if isinstance(entry, dict):
        _check_keys(entry, name, where)
    if isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "options"}:
        pass_name = entry["name"]
        if not isinstance(pass_name, str):
            raise UserInputError(
                f"{name}: {where}.name: expected a pass name, got {_shown(pass_name)}"
            )
        cls = _shared(name, f"{where}.name", get_pass, pass_name)
        opts = entry.get("options")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise UserInputError(
                f"{name}: {where}.options: options of pass {_shown(pass_name)} must be a "
                f"mapping, got {_shown(opts)}"
            )
        _check_keys(opts, name, f"{where}.options")
        _check_yaml_scalars(cls, opts, name, f"{where}.options")
        # Converted to the declared types here, so that a quoted "false" is False and a
        # wrong type stops the run before anything is loaded; only the options the recipe
        # gives are kept (the pass's own defaults fill the rest, for every caller alike).
        given = _shared(name, f"{where}.options", cls.given_options, opts)
        _check_targets(cls, given, name, f"{where}.options")
        _check_paths(given, name, f"{where}.options")
        return PassSpec(cls.name, given)
    raise UserInputError(
        f"{name}: {where}: a pass entry is a name or {{name: ..., options: {{...}}}}, "
        f"got {_shown(entry)}"
    )


def _check_yaml_scalars(cls: type[GraphPass], opts: dict, name: str, where: str) -> None:
    """A text option YAML read as something else, named with the YAML rule that did it:
    ``off``/``no`` are booleans, ``2:4`` the base-60 number 124 (YAML 1.1)."""
    for option in cls.options:
        value = opts.get(option.name)
        if option.type is not str or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool):
            why = "YAML reads unquoted yes/no/on/off/true/false as booleans"
        elif isinstance(value, int) and abs(value) >= 60:
            # N:M with N >= 1 reads as N*60 + M: never below 60.
            why = "YAML 1.1 reads an unquoted N:M as a base-60 number: 2:4 is 124"
        else:
            why = f"YAML read {_kind(value)}"
        raise UserInputError(
            f"{name}: {where}: pass {cls.name!r} option {option.name!r}: expected a string, "
            f'got {_shown(value)} ({why}; quote it: {option.name}: "...")'
        )


def _check_targets(cls: type[GraphPass], given: dict, name: str, where: str) -> None:
    """A pass's target (prune's ``flops``, erase-blocks' ``count``) checked by the parser of
    its flag, so that an out-of-range target is said to be one, under the recipe's key, and
    not found at run time as "give exactly one target" or as a flag the user never typed."""
    if cls.flag is None or cls.flag_metavar is None:
        return
    for option in sorted(_flag_targets(cls) & set(given)):
        value = given[option]
        if value in (None, "", 0):
            continue  # not given: the pass's own "give one target" says what is missing
        keyed = f"{option}=" in cls.flag_metavar
        text = f"{option}={value}" if keyed else str(value)
        try:
            cls.options_from_flag(text)
        except UserInputError as exc:
            # The flag's own words, less the flag: the recipe's key names what was given.
            reason = str(exc).removeprefix(f"{cls.flag} {text!r}: ")
            reason = capped(" ".join(reason.split()), SHARED_MESSAGE_CHARS)
            raise UserInputError(f"{name}: {where}.{option}: {_shown(value)}: {reason}") from None


# Options that name a file; "random" is calibration's word for generated data, not a file.
_PATH_OPTIONS = ("calib", "decisions")


def _check_paths(given: dict, name: str, where: str) -> None:
    for option in _PATH_OPTIONS:
        value = given.get(option)
        if isinstance(value, str) and value and value != "random":
            _check_exists(value, name, f"{where}.{option}")


def _check_exists(path: str, name: str, where: str) -> None:
    """A file a recipe names that does not exist, refused with where the path was looked
    for: paths in a recipe are relative to the working directory (as on the command line),
    not to the recipe's folder, which is the usual reason."""
    if not Path(path).exists():
        raise UserInputError(
            f"{name}: {where}: no such file {_shown(path)} (a recipe's paths are relative to "
            f"the working directory, {Path.cwd()}, not to the recipe's folder)"
        )


def _shared(name: str, where: str, check: Callable[..., _T], *args: Any) -> _T:
    """``check(*args)`` with its one-line UserInputError prefixed by the recipe and the key:
    shared code (the registry, the CLI's parsers) knows neither. Its message may quote the
    recipe's text in full (a pass name as long as the file), hence the cap."""
    try:
        return check(*args)
    except UserInputError as exc:
        message = capped(" ".join(str(exc).split()), SHARED_MESSAGE_CHARS)
        raise UserInputError(f"{name}: {where}: {message}") from None


def _shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A user's value quoted in an error message (:func:`~graphopt.registry.shown_value`: one
    line, capped; a recipe's value can be megabytes, and spans lines), YAML's scalars in
    YAML's spelling: ``true`` rather than Python's ``True``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return shown_value(value, limit)


def _shown_key(where: str) -> str:
    """A key path built from the recipe's own names (input names), capped for a message."""
    return capped(" ".join(where.split()), SHOWN_CHARS)


def _kind(value: Any) -> str:
    """A YAML value's kind, in YAML's words, for messages ("an integer")."""
    if value is None:
        return "null"
    kinds = ((bool, "a bool"), (int, "an integer"), (float, "a number"), (str, "a string"))
    kinds += ((list, "a list"), (dict, "a mapping"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), type(value).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return capped(text.splitlines()[0], SHARED_MESSAGE_CHARS) if text else type(exc).__name__
