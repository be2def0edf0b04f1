"""ONNX's own node test cases, turned into differential conformance checks for graphopt.

The installed ``onnx`` wheel carries the definitions of its backend node tests (a one-node
model, or the op's function expanded into several nodes, plus inputs and reference outputs
computed by onnx's reference code). They are generated in memory (a few seconds, fully
offline) rather than cached on disk: a cache would need invalidating on every onnx upgrade and
would save little.

A case is checked in three steps, always on ONNX Runtime's CPU provider:

1. *before*: the original model on the case's inputs must match the reference outputs with
   the backend-test tolerances (rtol 1e-3, atol 1e-7, bfloat16 two ULPs); cases ORT cannot
   run or gets wrong are counted with the reason and not used further;
2. *default*: graphopt's default pipeline, then the same comparison;
3. *baked*: the inputs become initializers (the graph has no inputs left, so graphopt's
   constant folding may compute everything) and the result must still match.

ORT runs with its default optimization level (``ORT_ENABLE_ALL``), unlike
:func:`graphopt.sessions.make_session`: this suite asks whether a user who deploys graphopt's
output with ORT's defaults still gets the right answer, and "before" and "after" run with the
same settings, so a difference is graphopt's doing. When a case regresses, the diagnosis
also reruns it with ORT's optimizations off to tell an interaction with ORT's own fusions
apart from a plain wrong rewrite.
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.ortrun import is_ml_dtype, run_session
from graphopt.pipeline import PassSpec, default_pipeline

RTOL = 1e-3
ATOL = 1e-7
# A single case must not hang the suite: a pass stuck in a loop counts as a crash.
CASE_TIME_LIMIT_S = 60
# Diagnosing a regression costs one pipeline run per pass; cap it per test.
MAX_DIAGNOSED = 25

_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


@dataclass(frozen=True)
class NodeCase:
    """One backend node test: a model, its inputs and the reference outputs."""

    name: str
    family: str  # the op under test ("Conv", "com.microsoft.X" for other domains)
    model: onnx.ModelProto
    inputs: tuple[Any, ...]  # ndarray / TensorProto / list (sequence) / None (empty optional)
    expected: tuple[Any, ...]
    rtol: float = RTOL
    atol: float = ATOL


@functools.cache
def node_cases() -> tuple[NodeCase, ...]:
    """Every node test case of the installed onnx, in onnx's order."""
    # The exporters run numpy code that warns on purpose (log(0), 1/0 for ±inf references).
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        from onnx.backend.test.case import node as node_tests

        raw = list(node_tests.collect_testcases(None))
    base_family: dict[str, str] = {}
    for case in raw:
        if not _EXPANDED.search(case.name):
            node = case.model.graph.node[-1]
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            base_family[case.name] = f"{domain}.{node.op_type}" if domain else node.op_type
    cases = []
    for case in raw:
        family = base_family.get(_EXPANDED.sub("", case.name), "expanded")
        (inputs, expected), *_ = case.data_sets
        cases.append(
            NodeCase(
                case.name, family, case.model, tuple(inputs), tuple(expected), case.rtol, case.atol
            )
        )
    return tuple(cases)


def families() -> dict[str, list[NodeCase]]:
    """Cases grouped by the op under test (an op's expanded-function cases included)."""
    grouped: dict[str, list[NodeCase]] = defaultdict(list)
    for case in node_cases():
        grouped[case.family].append(case)
    return dict(sorted(grouped.items()))


# ---------------------------------------------------------------------------------------------
# Running a model in ONNX Runtime and comparing with the reference


def make_session(model: bytes, optimized: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4
    # Cases are tiny; one thread each keeps two xdist workers from fighting over the cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict[str, Any], optimized: bool = True) -> list[Any]:
    session = make_session(model.SerializeToString(), optimized)
    names = [o.name for o in session.get_outputs()]
    return run_session(session, names, feeds)


def mismatch(expected: Sequence[Any], got: Sequence[Any], rtol: float, atol: float) -> str | None:
    """None when ``got`` matches the reference as the ONNX backend tests judge it."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for index, (ref, out) in enumerate(zip(expected, got, strict=True)):
        problem = _mismatch_one(ref, out, rtol, atol)
        if problem:
            return f"output {index}: {problem}"
    return None


def _mismatch_one(ref: Any, out: Any, rtol: float, atol: float) -> str | None:
    if isinstance(ref, onnx.TensorProto):
        ref = numpy_helper.to_array(ref)
    if ref is None or out is None:
        return None if ref is None and out is None else f"optional {out!r} vs {ref!r}"
    if isinstance(ref, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(ref):
            return f"sequence {type(out).__name__} of {_len(out)}, expected {len(ref)} items"
        for j, (r, o) in enumerate(zip(ref, out, strict=True)):
            problem = _mismatch_one(r, o, rtol, atol)
            if problem:
                return f"item {j}: {problem}"
        return None
    ref = np.asarray(ref)
    out = np.asarray(out)
    if out.shape != ref.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    if ref.dtype == object:
        return None if np.array_equal(out, ref) else "strings differ"
    if out.dtype != ref.dtype and is_ml_dtype(ref) and out.dtype.itemsize == ref.dtype.itemsize:
        out = out.view(ref.dtype)  # ORT hands float8/bfloat16 back as raw integers
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if is_ml_dtype(ref):
        if ref.dtype.name == "bfloat16":
            rtol = max(rtol, 2**-6)
        ref, out = ref.astype(np.float32), out.astype(np.float32)
    if out.dtype == np.bool_ or ref.size == 0:
        bad = out != ref
    else:
        # What np.testing.assert_allclose checks (NaN equals NaN), element by element.
        bad = ~np.isclose(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return (
            f"values differ: {int(bad.sum())}/{bad.size} elements, e.g. at {where} got "
            f"{out[where]!r}, expected {ref[where]!r}"
        )
    return None


def _len(value: Any) -> str:
    return str(len(value)) if isinstance(value, (list, tuple)) else "?"


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:240]


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (main thread on POSIX only; else no limit)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# The three checks


def feeds_of(case: NodeCase, model: onnx.ModelProto | None = None) -> dict[str, Any]:
    """The case inputs keyed by the graph's input names (present inputs, in order)."""
    graph = (model or case.model).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    return dict(zip(names, case.inputs, strict=False))


def check_before(case: NodeCase) -> str | None:
    """None when ORT gets the reference outputs on the original model, else why not."""
    return check_model(case, case.model, feeds_of(case))


def check_model(
    case: NodeCase, model: onnx.ModelProto, feeds: dict[str, Any], optimized: bool = True
) -> str | None:
    try:
        got = run_ort(model, feeds, optimized)
    except Exception as exc:
        return f"ORT fails: {first_line(exc)}"
    return mismatch(case.expected, got, case.rtol, case.atol)


@functools.cache
def before_status(name: str) -> str | None:
    return check_before(_by_name()[name])


@functools.cache
def _by_name() -> dict[str, NodeCase]:
    return {case.name: case for case in node_cases()}


def bake_inputs(case: NodeCase) -> tuple[onnx.ModelProto | None, str]:
    """The model with the case inputs as initializers, or (None, why it cannot be done)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    feeds = feeds_of(case)
    tensors = []
    for name, value in feeds.items():
        if value is None:
            return None, "an input is an empty optional"
        if isinstance(value, list):
            return None, "an input is a sequence (no sequence initializers)"
        if isinstance(value, onnx.TensorProto):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
        else:
            type_proto = next(i.type for i in model.graph.input if i.name == name)
            if not type_proto.HasField("tensor_type"):
                return None, f"an input has a non-tensor type ({type_proto.WhichOneof('value')})"
            try:
                tensor = numpy_helper.from_array(np.asarray(value), name)
            except Exception as exc:
                return None, f"input not expressible as an initializer ({first_line(exc)})"
        tensors.append(tensor)
    kept = [i for i in model.graph.input if i.name not in feeds]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(tensors)
    # Before IR 4 every initializer had to be a graph input (and so overridable).
    model.ir_version = max(model.ir_version, 4)
    return model, ""


@dataclass
class Regression:
    case: str
    symptom: str
    culprit: str = ""

    def line(self) -> str:
        blame = f" [{self.culprit}]" if self.culprit else ""
        return f"{self.case}: {self.symptom}{blame}"


@dataclass
class FamilyResult:
    """What one mode of the suite found for one op family (reported to the summary hook)."""

    family: str
    mode: str
    cases: int = 0
    passing_before: int = 0
    checked: int = 0
    passing_after: int = 0
    not_before: dict[str, int] = field(default_factory=dict)
    not_baked: dict[str, int] = field(default_factory=dict)
    regressions: list[Regression] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "mode": self.mode,
            "cases": self.cases,
            "passing_before": self.passing_before,
            "checked": self.checked,
            "passing_after": self.passing_after,
            "not_before": dict(self.not_before),
            "not_baked": dict(self.not_baked),
            "regressions": [r.line() for r in self.regressions],
        }


def run_graphopt(
    model: onnx.ModelProto, passes: list[str] | None = None, skip: Sequence[str] = ()
) -> onnx.ModelProto:
    """graphopt's default pipeline (or the given passes) without its own verification."""
    options = OptimizeOptions(
        passes=None if passes is None else [PassSpec(p) for p in passes],
        skip=list(skip),
        verify=False,
    )
    # Bytes, not the proto: graphopt then cannot share or touch the case's own model.
    return io.to_proto(optimize(model.SerializeToString(), None, options).model)


def check_graphopt(
    case: NodeCase,
    model: onnx.ModelProto,
    feeds: dict[str, Any],
    passes: list[str] | None = None,
    skip: Sequence[str] = (),
    optimized: bool = True,
) -> str | None:
    """None when graphopt's rewrite of ``model`` still gives the reference outputs."""
    try:
        with time_limit(CASE_TIME_LIMIT_S):
            rewritten = run_graphopt(model, passes, skip)
    except Exception as exc:
        return f"graphopt crashed: {first_line(exc)}"
    return check_model(case, rewritten, feeds, optimized)


def default_passes() -> list[str]:
    """The default pipeline's passes in order, each once."""
    names: list[str] = []
    for step in default_pipeline():
        names += [spec.name for spec in step.passes if spec.name not in names]
    return names


def blame(case: NodeCase, model: onnx.ModelProto, feeds: dict[str, Any]) -> str:
    """Which pass breaks the case: alone, or only together with others."""
    notes = []
    if check_graphopt(case, model, feeds, optimized=False) is None:
        notes.append("passes with ORT optimizations off")
    if check_graphopt(case, model, feeds, passes=[]) is not None:
        return "; ".join([*notes, "fails with no pass at all (load/save round trip)"])
    names = default_passes()
    alone = [n for n in names if check_graphopt(case, model, feeds, passes=[n]) is not None]
    if alone:
        return "; ".join([*notes, "pass " + ", ".join(alone)])
    fixers = [n for n in names if check_graphopt(case, model, feeds, skip=[n]) is None]
    if fixers:
        return "; ".join([*notes, "only in combination; skipping fixes it: " + ", ".join(fixers)])
    return "; ".join([*notes, "not attributable to a single pass"])


def run_family(family: str, cases: Sequence[NodeCase], mode: str) -> FamilyResult:
    """Check every case of a family in ``mode`` ("default" or "baked")."""
    result = FamilyResult(family, mode, cases=len(cases))
    for case in cases:
        reason = before_status(case.name)
        if reason is not None:
            key = _reason_key(reason)
            result.not_before[key] = result.not_before.get(key, 0) + 1
            continue
        result.passing_before += 1
        if mode == "baked":
            model, why = bake_inputs(case)
            if model is None:
                result.not_baked[why] = result.not_baked.get(why, 0) + 1
                continue
            feeds: dict[str, Any] = {}
            baked_reason = check_model(case, model, feeds)
            if baked_reason is not None:
                key = "baked original fails in ORT: " + _reason_key(baked_reason)
                result.not_baked[key] = result.not_baked.get(key, 0) + 1
                continue
        else:
            model, feeds = case.model, feeds_of(case)
        result.checked += 1
        symptom = check_graphopt(case, model, feeds)
        if symptom is None:
            result.passing_after += 1
            continue
        regression = Regression(case.name, symptom)
        if len(result.regressions) < MAX_DIAGNOSED:
            regression.culprit = blame(case, model, feeds)
        result.regressions.append(regression)
    return result


def _reason_key(reason: str) -> str:
    """Group failure reasons: drop the parts that name the particular node or values."""
    reason = re.sub(r"\(node [^)]*\)", "", reason)
    reason = re.sub(
        r"Could not find an implementation for (\w+)\(\d+\).*", r"no ORT kernel for \1", reason
    )
    reason = reason.split(" for node ")[0].split("values differ")[0] + (
        "values differ" if "values differ" in reason else ""
    )
    return reason[:110]
