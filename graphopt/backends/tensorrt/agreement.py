"""Does the static rule table agree with the real parser? The corpus and the comparison.

The corpus: the ONNX node tests (generated in memory from the ``onnx`` wheel's test cases;
the wheel ships their code, not always their files) and any models the caller adds (the
catalog models in their float and quantized forms). A case agrees when both reject it or
both accept it. Used by ``bench/tensorrt_lint_agreement.py`` (every case) and the tests (a
sample).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.isolated import NativeCrash, ParseSummary, parse_isolated
from graphopt.backends.tensorrt.module import ParserError, TensorRT
from graphopt.backends.tensorrt.rules import static_findings


@dataclass(frozen=True)
class Verdict:
    name: str
    parser_ok: bool
    static_ok: bool
    parser_reason: str
    static_reason: str

    @property
    def agrees(self) -> bool:
        return self.parser_ok == self.static_ok


def node_tests() -> Iterator[tuple[str, onnx.ModelProto]]:
    """The ONNX node tests' models, by test name, in name order."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():  # the cases' numpy reference code overflows on purpose
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    for case in sorted(cases, key=lambda c: c.name):
        yield case.name, case.model


def verdict(trt: TensorRT, name: str, model: onnx.ModelProto) -> Verdict:
    """The real parser's and the static table's verdicts on one model."""
    try:
        parsed = parse_isolated(trt, model.SerializeToString())
    except NativeCrash as crash:  # TensorRT cannot load it: a rejection, saying so
        parsed = ParseSummary(False, [ParserError(-1, "", "", str(crash))])
    # The builder rules judge what the parser accepts (the engine build refuses it): not
    # the parser's verdict, so not compared with it.
    errors = [f for f in static_findings(model) if f.severity == ERROR and f.rule != "builder"]
    return Verdict(
        name,
        parsed.ok,
        not errors,
        parsed.errors[0].reason if parsed.errors else "",
        errors[0].reason if errors else "",
    )
