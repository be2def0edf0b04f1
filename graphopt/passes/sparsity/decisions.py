"""The sparse-kernels pass's decisions, checked as they are read.

A decisions file (``--sparse-kernels-decisions``: a lowered model, whose metadata holds the
record, or a JSON file of it) may be hand-written or edited, and what it says decides what the
output holds and what its metadata records. So every field the record can hold is checked for
its type and range as the file is read, and :func:`unknown_layers` / :func:`missing_layer`
make a file that does not fit the model an error: a replay writes the model the decisions
describe, or says why not, rather than measuring or ignoring what does not match. Every error
is one line naming the file, the layer and the field. The record a model already carries
(an earlier run's, which the pass extends) is checked the same way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import onnx_ir as ir

from graphopt.backends.ort_custom_ops import OWN_DOMAIN, OWN_DOMAIN_VERSION
from graphopt.errors import UserInputError
from graphopt.passes.sparsity.crossover import METADATA_KEY, read_recorded
from graphopt.registry import shown_value

FLAG = "--sparse-kernels-decisions"
OPS = ("MatMul", "Gemm", "QMatMul")
EPILOGUES = ("fused", "separate")
# What a layer must state: which layer, and what identifies its weight (checked against the
# model, so that decisions of another model or pipeline are refused, not misapplied).
REQUIRED = ("layer", "K", "N", "format")
_COUNTS = ("K", "N", "M")
_NUMBERS = ("dense_ms", "sparse_ms", "separate_ms", "speedup")
_STRINGS = ("key",)
FIELDS = frozenset(
    (*REQUIRED, *_COUNTS, *_NUMBERS, *_STRINGS, "op", "sparsity", "epilogue", "lowered")
)
_TOP = frozenset(("domain", "version", "layers"))
_FORMAT = re.compile(r"2:4|bsr[1-9][0-9]*x[1-9][0-9]*")

Decisions = dict[str, dict[str, Any]]


def load(source: str) -> Decisions:
    """Decisions by layer from a lowered model's metadata or a JSON file ("" -> none)."""
    if not source:
        return {}
    where = f"{FLAG} {source}"
    return read_recorded(
        source, METADATA_KEY, "sparse-kernel decisions", lambda data: parse(data, where)
    )


def recorded(model: ir.Model) -> Decisions:
    """The decisions already in ``model``'s metadata (an earlier run's, or an earlier round of
    this one), checked like a decisions file: the output's record extends them."""
    text = model.metadata_props.get(METADATA_KEY)
    if not text:
        return {}
    where = f"the model's metadata {METADATA_KEY}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserInputError(f"{where}: not JSON ({exc})") from None
    return parse(data, where)


def parse(data: Any, where: str) -> Decisions:
    """``{"domain", "version", "layers": [...]}`` (as recorded) or a bare list of layers,
    checked field by field; ``where`` starts every error."""
    if isinstance(data, dict):
        extra = sorted(set(data) - _TOP, key=str)
        if extra:
            raise UserInputError(
                f"{where}: unknown key {shown_value(extra[0])} (known: {', '.join(sorted(_TOP))})"
            )
        if "domain" in data and data["domain"] != OWN_DOMAIN:
            raise UserInputError(
                f"{where}: domain must be {OWN_DOMAIN!r} (got {shown_value(data['domain'])})"
            )
        version = data.get("version", OWN_DOMAIN_VERSION)
        if type(version) is not int or version != OWN_DOMAIN_VERSION:
            raise UserInputError(
                f"{where}: version must be {OWN_DOMAIN_VERSION} (the ops this graphopt writes; "
                f"got {shown_value(version)})"
            )
        if "layers" not in data:
            raise UserInputError(f'{where}: no "layers"')
        entries = data["layers"]
    else:
        entries = data
    if not isinstance(entries, list):
        raise UserInputError(
            f"{where}: layers must be a list of layer decisions (got {type(entries).__name__})"
        )
    layers: Decisions = {}
    for index, entry in enumerate(entries):
        name = _check_entry(entry, index, where)
        if name in layers:
            raise UserInputError(f"{where}: layer {name!r} is decided twice")
        layers[name] = dict(entry)
    return layers


def _check_entry(entry: Any, index: int, where: str) -> str:
    """The layer's name, once every field of ``entry`` is of its type and range."""
    if not isinstance(entry, dict):
        raise UserInputError(
            f"{where}: layers[{index}] must be an object (got {shown_value(entry)})"
        )
    name = entry.get("layer")
    if not isinstance(name, str) or not name:
        raise UserInputError(
            f"{where}: layers[{index}]: layer must be a non-empty string (got "
            f"{shown_value(name) if 'layer' in entry else 'nothing'})"
        )
    at = f"{where}: layer {shown_value(name)}"

    def bad(field: str, what: str) -> UserInputError:
        return UserInputError(f"{at}: {field} must be {what} (got {shown_value(entry[field])})")

    extra = sorted(set(entry) - FIELDS, key=str)
    if extra:
        raise UserInputError(
            f"{at}: unknown field {shown_value(extra[0])} (known: {', '.join(sorted(FIELDS))})"
        )
    missing = [field for field in REQUIRED if field not in entry]
    if missing:
        raise UserInputError(f"{at}: no {missing[0]}")
    for field in _COUNTS:
        # bool is an int in Python; JSON's true is no count.
        if field in entry and (type(entry[field]) is not int or entry[field] < 0):
            raise bad(field, "a whole number >= 0")
    for field in ("K", "N"):
        if entry[field] < 1:
            raise bad(field, "a whole number >= 1")
    if not isinstance(entry["format"], str) or not _FORMAT.fullmatch(entry["format"]):
        raise bad("format", "'2:4' or 'bsrRxC'")
    for field in _NUMBERS:
        if field in entry and not _number(entry[field], 0.0, math.inf):
            raise bad(field, "a finite number >= 0")
    if "sparsity" in entry and not _number(entry["sparsity"], 0.0, 1.0):
        raise bad("sparsity", "a number from 0 to 1")
    for field in _STRINGS:
        if field in entry and not isinstance(entry[field], str):
            raise bad(field, "a string")
    if "op" in entry and entry["op"] not in OPS:
        raise bad("op", " or ".join(repr(op) for op in OPS))
    if "epilogue" in entry and entry["epilogue"] not in EPILOGUES:
        raise bad("epilogue", " or ".join(repr(e) for e in EPILOGUES))
    if "lowered" in entry:
        if type(entry["lowered"]) is not bool:
            raise bad("lowered", "true or false")
    elif "dense_ms" not in entry or "sparse_ms" not in entry:
        # A hand-written file may give the timings only: the pass decides with its threshold.
        raise UserInputError(f"{at}: needs lowered, or dense_ms and sparse_ms")
    elif not entry["sparse_ms"] > 0:
        raise bad("sparse_ms", "above 0 when lowered is not given (dense_ms / sparse_ms decides)")
    return name


def _number(value: Any, low: float, high: float) -> bool:
    if type(value) not in (int, float):  # not bool, not a string of digits
        return False
    return math.isfinite(value) and low <= value <= high


def check_match(where: str, name: str, entry: dict[str, Any], found: dict[str, Any]) -> None:
    """``entry`` decides the layer the model has (``found``: its K, N, format, op and whether
    it has an activation to leave to ORT), or a one-line error says what differs."""
    for field in ("K", "N", "format", "op"):
        if field in entry and entry[field] != found[field]:
            raise UserInputError(
                f"{where}: layer {name!r} has {field} {found[field]!r}, the decisions say "
                f"{shown_value(entry[field])}"
            )
    if entry.get("epilogue") == "separate" and not found["activation"]:
        raise UserInputError(
            f"{where}: layer {name!r}: epilogue 'separate' leaves an activation to ONNX Runtime, "
            "and the layer has none (use 'fused')"
        )


def unknown_layers(where: str, given: Decisions, known: set[str]) -> None:
    """A layer the decisions name that is neither a sparse layer of the model nor one an
    earlier run or round decided (``known``): the decisions are for another model."""
    unknown = sorted(set(given) - known)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise UserInputError(
            f"{where}: layer {unknown[0]!r}{more} is not a sparse MatMul/Gemm layer of this "
            "model (decisions of another model, or of another pipeline?)"
        )


def missing_layer(where: str, name: str, found: dict[str, Any], given: Decisions) -> UserInputError:
    """A sparse layer of the model the decisions do not decide: refused, not measured, so that
    a replay writes what the decisions describe."""
    return UserInputError(
        f"{where}: no decision for layer {name!r} ({found['op']} K {found['K']} N {found['N']} "
        f"{found['format']}; the decisions name {len(given)} layer(s))"
    )
