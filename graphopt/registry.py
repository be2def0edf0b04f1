"""What a pass is, and the registry that lists every pass graphopt knows.

A pass is a small class: a ``name``, a one-line docstring, whether it is ``exact`` (outputs
unchanged within float tolerance) or lossy, its ``stage`` in the pipeline, its options, and
whether it rewrites inside subgraphs (If/Loop/Scan bodies). ``rewrite`` edits the model in
place through :mod:`graphopt.editing` and returns how many rewrites it made (its hits).

Passes never edit a tensor's data in place: they create new tensors (``editing`` helpers do).
Snapshots for rollback share tensor objects with the model, so an in-place edit would
corrupt the rollback too.

Passes derive from onnx-ir's ``InPlacePass`` so they also run under onnx-ir's own
``PassManager``; graphopt's :class:`~graphopt.pipeline.PassManager` adds timing, the
per-pass table, fixed-point iteration, verification and rollback.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError

if TYPE_CHECKING:
    from graphopt.analysis.origins import OriginalNodes


class Stage(enum.IntEnum):
    """Where a pass runs in the pipeline; lossy stages run in this fixed order."""

    PREPARE = 0  # once, before anything else (IR upgrades, input fixes)
    CLEANUP = 1  # exact erasure, iterated to a fixed point
    FUSION = 2  # exact fusions
    PRUNE = 10
    FACTORIZE = 11
    SPARSIFY = 12
    QUANTIZE = 13
    # Exact passes that run only when asked for (their flag), after everything else: lowering
    # to graphopt's own kernels must see the final graph (the ORT fusions' BiasGelu included).
    LOWER = 14


LOSSY_STAGES = (Stage.PRUNE, Stage.FACTORIZE, Stage.SPARSIFY, Stage.QUANTIZE)


# Spellings a recipe, the CLI or the API may use for a boolean option. YAML reads ``yes``/``no``
# as booleans already, but a quoted ``"false"`` is a string, and a non-empty string is truthy:
# without conversion ``force: "false"`` would force.
_TRUE = frozenset(("true", "yes", "on", "1"))
_FALSE = frozenset(("false", "no", "off", "0"))
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
}
_INVALID = object()  # convert's "no conversion applies" (None is a value: "not given")


@dataclass(frozen=True)
class PassOption:
    """One option a pass accepts (from a recipe or the CLI).

    ``default`` is the one default of the option: the CLI, the API and recipes leave an option
    they were not given out of the pass's options, and the pass fills it from here.
    """

    name: str
    type: type
    default: Any
    help: str
    # The command-line flag that sets it (``--criterion``); None: recipes and the API only.
    # The CLI builds its lossy-pass flags from these declarations (``graphopt.cli``).
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    # The closed interval a given number must lie in (the default may lie outside it: a
    # sentinel for "not given").
    bounds: tuple[float, float] | None = None
    # The bounds themselves refused (an open interval): a fraction to remove, where 0 and 1
    # are no targets.
    open_bounds: bool = False
    # True for a path option whose empty value is the default "not given": given as "" it
    # is a mistake (an unset shell variable), not a silent "no file" (``--calib ''``).
    nonempty: bool = False

    def convert(self, value: Any, owner: str) -> Any:
        """``value`` as ``type``, within ``choices`` and ``bounds``; anything else is a
        one-line error naming the pass and option.

        ``None`` means "not given": the default. Booleans accept true/false, yes/no, on/off and
        1/0 (also as strings); integers accept integral numbers and their text; floats any
        finite real number or its text; strings any text or path. Nothing else is coerced: a
        bool is not a number here, so ``ratio: true`` is an error rather than 1.0. A choice
        matches in any case and comes back in its declared spelling (:meth:`canonical`). The
        CLI's argparse checks choices too; recipes and the API reach only this check.
        """
        if value is None:
            return self.default
        converted = _converted(self.type, value)
        where = f"pass {owner!r} option {self.name!r}" + (f" ({self.flag})" if self.flag else "")
        if converted is _INVALID:
            expected = _TYPE_NAMES.get(self.type, self.type.__name__)
            raise UserInputError(f"{where}: expected {expected}, got {shown_value(value)}")
        if self.nonempty and isinstance(converted, str) and not converted.strip():
            raise UserInputError(f"{where}: empty path; give the file (or leave the option out)")
        converted = self.canonical(converted)
        if self.choices is not None and converted not in self.choices:
            raise UserInputError(
                f"{where}: expected one of {', '.join(self.choices)}, got {converted!r}"
            )
        if self.bounds is not None:
            lo, hi = self.bounds
            inside = lo < converted < hi if self.open_bounds else lo <= converted <= hi
            if not inside:
                interval = f"({lo:g}, {hi:g})" if self.open_bounds else f"[{lo:g}, {hi:g}]"
                raise UserInputError(
                    f"{where}: expected a number in {interval}, got {shown_value(value)}"
                )
        return converted

    def canonical(self, value: Any) -> Any:
        """A choice in its declared spelling: choices match case-insensitively (``INT8``,
        ``L1``), as the passes' own flags (``--quantize INT8``) always did, so the CLI, recipes
        and the API accept and record the same thing. Anything else is returned as it is."""
        if self.choices is None or not isinstance(value, str):
            return value
        folded = value.strip().casefold()
        return next((choice for choice in self.choices if choice.casefold() == folded), value)


def shown_value(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line and at most ``limit`` characters (an array's repr spans
    lines and pages)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"an integer of {value.bit_length()} bits"
    return capped(" ".join(text.split()), limit)


def capped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _converted(kind: type, value: Any) -> Any:
    """``value`` as ``kind``, or ``_INVALID`` when it is not one (see PassOption.convert)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    is_real = is_int or isinstance(value, (float, np.floating))
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if is_int and value in (0, 1):
            return bool(value)
        if text in _TRUE | _FALSE:
            return text in _TRUE
    elif kind is int:
        if is_real and float(value).is_integer():
            return int(value)
        if text is not None and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    elif kind is float:
        # NaN and infinities are no setting: NaN passes every comparison a range check makes.
        if is_real and np.isfinite(value):
            return float(value)
        if text is not None:
            with contextlib.suppress(ValueError):
                number = float(text)
                if np.isfinite(number):
                    return number
    elif kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif isinstance(value, kind):
        return value
    return _INVALID


@dataclass
class PassContext:
    """Settings shared by all passes of one run (they never parse arguments themselves)."""

    # Constant folding may create at most this many bytes per new tensor; None = no limit.
    fold_limit_bytes: int | None = 1 << 20
    # Concrete values for symbolic input dims: {input name: shape}.
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The input model's main-graph nodes, as the pass manager found them before any pass:
    # what the user's names (--exclude) refer to once fusions renamed nodes.
    original_nodes: OriginalNodes | None = None
    target: str = "portable"
    notes: list[str] = field(default_factory=list)
    # Structured results of passes that have more to say than a hit count (e.g. pruning's
    # fidelity report), by pass name.
    details: dict[str, Any] = field(default_factory=dict)
    # The model before the run's first lossy pass, set by the pass manager once a lossy pass
    # has changed the model; None while a pass is given that model itself. A later lossy
    # pass reports its fidelity (and checks mixed precision's targets) against it: what the
    # user gets is the whole run's change, not the last pass's share of it.
    reference_model: ir.Model | None = None
    # The lossy passes that changed the model since ``reference_model`` was taken.
    reference_includes: tuple[str, ...] = ()

    def note(self, message: str) -> None:
        """Record something the user should read in the report (said once)."""
        if message not in self.notes:
            self.notes.append(message)

    def fidelity_reference(self, given: ir.Model) -> ir.Model:
        """The model a lossy pass given ``given`` reports its fidelity against: the run's
        original when an earlier lossy pass changed it, else ``given`` itself."""
        return self.reference_model if self.reference_model is not None else given

    def fidelity_source(self, source: str) -> str:
        """``source`` (where fidelity was measured) led by which earlier lossy passes the
        reference's distance includes, when the reference is the run's original."""
        if self.reference_model is None or not source:
            return source
        return f"includes {', '.join(self.reference_includes)}; {source}"


class GraphPass(ir.passes.InPlacePass):
    """Base class of graphopt passes. Subclasses set the class variables and ``rewrite``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    stage: ClassVar[Stage] = Stage.CLEANUP
    # True when the pass also rewrites inside If/Loop/Scan bodies; False means it leaves
    # them untouched (the report says so when a model has subgraphs).
    handles_subgraphs: ClassVar[bool] = True
    options: ClassVar[tuple[PassOption, ...]] = ()
    # A lossy pass asked for on the command line: the flag (``--prune``), its value's form and
    # help; ``options_from_flag`` turns the value into options. None: no flag of its own.
    flag: ClassVar[str | None] = None
    # None: the flag is a switch that takes no value (``options_from_flag("on")``).
    flag_metavar: ClassVar[str | None] = "VALUE"
    flag_help: ClassVar[str] = ""
    # Trigger op types: the pass can only change a model that has a node (any domain;
    # subgraphs and functions included) of one of these types, so the pass manager skips
    # it on other models. None: it may change any model, it always runs.
    ops: ClassVar[frozenset[str] | None] = None
    # The targets (``--target``) the pass rewrites for; on any other it changes nothing and
    # the pass manager skips it. None: every target.
    targets: ClassVar[frozenset[str] | None] = None
    # True for costly passes: the pass manager fingerprints the model around each run and
    # skips the pass on a state it has already left unchanged (same input, same no-op).
    memoize: ClassVar[bool] = False

    def __init__(self, context: PassContext | None = None, **options: Any) -> None:
        super().__init__()
        self.context = context or PassContext()
        self.settings = self.check_options(options)
        # The options the caller set (a value equal to the default included): a pass says
        # when one of them does nothing in this run.
        self.given = frozenset(name for name, value in options.items() if value is not None)
        self.hits = 0

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Every option of the pass: the given ones converted to their declared types, the
        others at their defaults. Unknown names and wrong types are bad input (exit 2), not a
        crash inside the pipeline."""
        known = {opt.name: opt for opt in cls.options}
        unknown = set(options) - set(known)
        if unknown:
            raise UserInputError(f"pass {cls.name!r} has no option(s) {sorted(unknown)}")
        return {
            opt.name: opt.convert(options[opt.name], cls.name)
            if opt.name in options
            else opt.default
            for opt in cls.options
        }

    @classmethod
    def given_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options given, converted to their declared types (``"64"`` -> 64, a Path ->
        its text, ``"INT8"`` -> ``"int8"``) and nothing else: what runs is what the output
        records, whichever door (CLI, recipe, API) the values came in by. Options left out
        (or given as None) stay out (the pass fills its defaults, and the record keeps "not
        set" apart), except one with a single choice, recorded as what it must be
        (requantize's ``mode``)."""
        checked = cls.check_options(options)
        fixed = {o.name for o in cls.options if o.choices is not None and len(o.choices) == 1}
        # None is "not given" (PassOption.convert): left out, as the CLI leaves it.
        given = {name for name, value in options.items() if value is not None}
        return {name: checked[name] for name in checked if name in given or name in fixed}

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """Options from the text of the flag that asks for this lossy pass (``--prune T``)."""
        from graphopt.errors import UserInputError

        raise UserInputError(f"pass {cls.name!r} takes no flag value {text!r}")

    @classmethod
    def flag_of(cls, option: str) -> str:
        """The command-line flag of one of this pass's options (it must have one)."""
        flag = next(o.flag for o in cls.options if o.name == option)
        assert flag is not None
        return flag

    @classmethod
    def description(cls) -> str:
        """The first line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def applies(cls, op_types: frozenset[str]) -> bool:
        """False when a model with these op types certainly gives the pass nothing to do."""
        return cls.ops is None or not cls.ops.isdisjoint(op_types)

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> int:
        """Edit ``model`` in place; return the number of rewrites made."""

    @classmethod
    def serves(cls, target: str) -> bool:
        """Whether the pass rewrites anything for ``target``."""
        return cls.targets is None or target in cls.targets

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.serves(self.context.target):
            return ir.passes.PassResult(model, modified=False)
        hits = self.rewrite(model)
        self.hits += hits
        return ir.passes.PassResult(model, modified=hits > 0)


PassFactory = Callable[..., GraphPass]
_REGISTRY: dict[str, type[GraphPass]] = {}


def register(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: add a pass to the registry under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}")
    if not cls.description():
        raise ValueError(f"pass {cls.name!r} needs a one-line docstring")
    _REGISTRY[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[GraphPass]]:
    """Every registered pass by name, in pipeline order (stage, then registration)."""
    _load_builtin_passes()
    order = sorted(_REGISTRY.values(), key=lambda cls: cls.stage)
    return {cls.name: cls for cls in order}


def flagged_lossy_passes() -> list[type[GraphPass]]:
    """The passes that declare a flag of their own (``--prune``), in pipeline order: the lossy
    ones and the exact opt-in ones of ``Stage.LOWER`` (``--sparse-kernels``)."""
    return [
        cls
        for cls in all_passes().values()
        if cls.flag and (not cls.exact or cls.stage == Stage.LOWER)
    ]


def flag_key(flag: str) -> str:
    """A command-line flag as a Python name: ``--round-to`` -> ``round_to`` (the API keyword
    and ``OptimizeOptions.flags`` key of the flag)."""
    return flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class FlagTarget:
    """What one lossy-pass flag sets: the pass itself (``option`` None) or one of its options."""

    owner: type[GraphPass]
    option: str | None
    flag: str


def flag_owners() -> dict[str, list[FlagTarget]]:
    """Each flag key (``prune``, ``criterion``, ``calib``) and what it sets, per pass. The CLI,
    the API's keywords (``OptimizeOptions(prune=..., calib=...)``) and flags next to a recipe
    all go through this table; an option flag two passes declare (``--calib``) sets both."""
    owners: dict[str, list[FlagTarget]] = {}
    for cls in flagged_lossy_passes():
        assert cls.flag is not None
        owners.setdefault(flag_key(cls.flag), []).append(FlagTarget(cls, None, cls.flag))
        for option in cls.options:
            if option.flag:
                target = FlagTarget(cls, option.name, option.flag)
                owners.setdefault(flag_key(option.flag), []).append(target)
    return owners


def flag_names() -> frozenset[str]:
    return frozenset(flag_owners())


def get_pass(name: str) -> type[GraphPass]:
    passes = all_passes()
    if name not in passes:
        raise UserInputError(f"unknown pass {name!r}; `graphopt passes` lists them")
    return passes[name]


# The built-in passes are imported once, under a lock: "graphopt.passes" is in sys.modules as
# soon as a thread starts importing it, and a second thread that took that for "loaded" saw a
# half-filled registry (1 pass of 57: "unknown option(s) 'calib'", "no passes to run").
_LOAD_LOCK = threading.RLock()
_loaded = False
_loading = False  # set while the thread holding _LOAD_LOCK imports the package


def _load_builtin_passes() -> None:
    global _loaded, _loading
    if _loaded:
        return
    with _LOAD_LOCK:
        # _loading: a pass module read the registry while the package imports (same thread,
        # the lock is reentrant); it sees the passes registered so far, as it always did.
        if _loaded or _loading:
            return
        _loading = True
        try:
            from graphopt import _deferred

            # onnxscript's folder imports onnx's reference evaluator, which a run rarely calls.
            _deferred.defer_onnx_reference()
            # Importing the package registers its passes (each module uses @register). If
            # another thread is importing it already, the import system waits for it to end.
            import graphopt.passes  # noqa: F401
        finally:
            _loading = False
        _loaded = True
