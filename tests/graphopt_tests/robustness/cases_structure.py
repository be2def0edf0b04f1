"""Hostile cases 1-9: corrupt protobufs, versions, domains, cycles, dangling, duplicate and
empty names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt_tests.robustness.build import F, _add, base_bytes, base_model, model, vi, writer

# --- 1. truncated protobufs ----------------------------------------------------------------

for _frac in (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
    _add(
        "truncated",
        f"keep{int(_frac * 100)}pct",
        writer(lambda f=_frac: base_bytes()[: int(len(base_bytes()) * f)]),
    )
_add("truncated", "minus1byte", writer(lambda: base_bytes()[:-1]))
_add("truncated", "one_byte", writer(lambda: base_bytes()[:1]))

# --- 2. bit-flipped protobufs ----------------------------------------------------------------


def _flipped(seed: int, flips: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(base_bytes())
    for _ in range(flips):
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
    return bytes(data)


for _seed in range(40):
    _add("bitflip", f"seed{_seed}", writer(lambda s=_seed: _flipped(s, 1 + s % 4)))
_add("bitflip", "garbage_random", writer(lambda: np.random.default_rng(7).bytes(500)))
_add("bitflip", "all_ff", writer(lambda: b"\xff" * 300))

# --- 3. IR versions --------------------------------------------------------------------------


def _with_ir(version: int) -> onnx.ModelProto:
    proto = base_model()
    proto.ir_version = version
    return proto


for _v in (0, -1, -(2**40), 1, 2, 3, 11, 99, 2**40, 2**62):
    _add("ir_version", f"ir{_v}", writer(lambda v=_v: _with_ir(v)))

# --- 4. opset versions -----------------------------------------------------------------------


def _with_opset(version: int, domain: str = "") -> onnx.ModelProto:
    proto = base_model()
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid(domain, version))
    return proto


for _v in (0, -1, -(2**40), 1, 6, 99, 10**6, 2**62):
    _add("opset_version", f"opset{_v}", writer(lambda v=_v: _with_opset(v)))
_add("opset_version", "no_opset_import", writer(lambda: _with_opset(17, "x.other")))


def _two_default_opsets() -> onnx.ModelProto:
    proto = base_model()
    proto.opset_import.append(helper.make_opsetid("", 13))
    return proto


_add("opset_version", "default_domain_twice", writer(_two_default_opsets))

# --- 5. unknown domains and ops --------------------------------------------------------------


def _unknown(op: str, domain: str, imported: bool, version: int = 1) -> onnx.ModelProto:
    extra = [helper.make_opsetid(domain, version)] if imported and domain else []
    return model(
        [helper.make_node(op, ["x"], ["t"], domain=domain), helper.make_node("Relu", ["t"], ["y"])],
        [vi("x")],
        [vi("y")],
        extra_opsets=extra,
    )


_add("unknown_domain", "imported", writer(lambda: _unknown("Foo", "com.unknown", True)))
_add("unknown_domain", "not_imported", writer(lambda: _unknown("Foo", "com.unknown", False)))
_add("unknown_domain", "unknown_default_op", writer(lambda: _unknown("NoSuchOp", "", False)))
_add("unknown_domain", "ms_unknown_op", writer(lambda: _unknown("Nope", "com.microsoft", True)))
_add("unknown_domain", "onnx_ml_relu", writer(lambda: _unknown("Relu", "ai.onnx.ml", True, 3)))
_add("unknown_domain", "weird_domain_chars", writer(lambda: _unknown("Foo", "../../x;rm", True)))
_add("unknown_domain", "future_version", writer(lambda: _unknown("Foo", "com.x", True, 2**40)))


def _unknown_in_dead_code() -> onnx.ModelProto:
    proto = base_model()
    proto.graph.node.append(helper.make_node("Foo", ["x"], ["dead"], domain="com.unknown"))
    proto.opset_import.append(helper.make_opsetid("com.unknown", 1))
    return proto


_add("unknown_domain", "dead_unknown_node", writer(_unknown_in_dead_code))

# --- 6. cycles -------------------------------------------------------------------------------


def _cycle(kind: str) -> onnx.ModelProto:
    if kind == "self":
        nodes = [helper.make_node("Add", ["x", "a"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    elif kind == "two":
        nodes = [
            helper.make_node("Add", ["x", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Identity", ["b"], ["y"]),
        ]
    elif kind == "three":
        nodes = [
            helper.make_node("Add", ["x", "c"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Neg", ["b"], ["c"]),
            helper.make_node("Identity", ["c"], ["y"]),
        ]
    elif kind == "identity_loop":
        nodes = [
            helper.make_node("Identity", ["b"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Add", ["x", "a"], ["y"]),
        ]
    elif kind == "dead_cycle":
        nodes = [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Identity", ["q"], ["p"]),
            helper.make_node("Identity", ["p"], ["q"]),
        ]
    else:  # output produced by the cycle
        nodes = [
            helper.make_node("Mul", ["x", "y"], ["y"]),
        ]
    return model(nodes, [vi("x")], [vi("y")])


for _k in ("self", "two", "three", "identity_loop", "dead_cycle", "output_in_cycle"):
    _add("cycle", _k, writer(lambda k=_k: _cycle(k)))

# --- 7. dangling inputs ----------------------------------------------------------------------


def _dangling(kind: str) -> onnx.ModelProto:
    if kind == "node_input":
        nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    elif kind == "output_unproduced":
        nodes = [helper.make_node("Relu", ["x"], ["t"])]
    elif kind == "only_ghost":
        nodes = [helper.make_node("Relu", ["ghost"], ["y"])]
    elif kind == "dead_ghost":
        nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["ghost"], ["z"])]
    elif kind == "value_info_only":
        proto = model([helper.make_node("Relu", ["v"], ["y"])], [vi("x")], [vi("y")])
        proto.graph.value_info.append(vi("v"))
        return proto
    else:  # produced later in the node list (unsorted, not a cycle)
        nodes = [helper.make_node("Relu", ["t"], ["y"]), helper.make_node("Neg", ["x"], ["t"])]
    return model(nodes, [vi("x")], [vi("y")])


for _k in (
    "node_input",
    "output_unproduced",
    "only_ghost",
    "dead_ghost",
    "value_info_only",
    "unsorted",
):
    _add("dangling", _k, writer(lambda k=_k: _dangling(k)))

# --- 8. duplicate names ----------------------------------------------------------------------


def _dup(kind: str) -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    w2 = onnx.numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "w")
    if kind == "two_producers":
        return model(
            [
                helper.make_node("Relu", ["x"], ["t"]),
                helper.make_node("Neg", ["x"], ["t"]),
                helper.make_node("Identity", ["t"], ["y"]),
            ],
            [vi("x")],
            [vi("y")],
        )
    if kind == "two_inputs":
        return model([helper.make_node("Add", ["x", "x"], ["y"])], [vi("x"), vi("x")], [vi("y")])
    if kind == "two_outputs":
        return model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y"), vi("y")])
    if kind == "two_initializers":
        return model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x")], [vi("y")], [w, w2])
    if kind == "node_overwrites_input":
        return model(
            [helper.make_node("Relu", ["x"], ["x"]), helper.make_node("Neg", ["x"], ["y"])],
            [vi("x")],
            [vi("y")],
        )
    if kind == "node_overwrites_initializer":
        return model(
            [helper.make_node("Relu", ["x"], ["w"]), helper.make_node("Add", ["x", "w"], ["y"])],
            [vi("x")],
            [vi("y")],
            [w],
        )
    if kind == "input_is_initializer":
        return model(
            [helper.make_node("Add", ["x", "w"], ["y"])], [vi("x"), vi("w")], [vi("y")], [w]
        )
    if kind == "output_is_input":
        return model([helper.make_node("Relu", ["x"], ["t"])], [vi("x")], [vi("x")])
    # same node name twice (allowed by ONNX) and same output listed twice on one node
    return model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="n"),
            helper.make_node("Split", ["a"], ["y", "y"], name="n", axis=1, num_outputs=2),
        ],
        [vi("x")],
        [vi("y", F, [1, 2])],
        opset=18,
    )


for _k in (
    "two_producers",
    "two_inputs",
    "two_outputs",
    "two_initializers",
    "node_overwrites_input",
    "node_overwrites_initializer",
    "input_is_initializer",
    "output_is_input",
    "same_output_twice_on_node",
):
    _add("duplicate_names", _k, writer(lambda k=_k: _dup(k)))

# --- 9. empty names --------------------------------------------------------------------------


def _empty(kind: str) -> onnx.ModelProto:
    if kind == "graph_input":
        return model([helper.make_node("Relu", [""], ["y"])], [vi("")], [vi("y")])
    if kind == "graph_output":
        return model([helper.make_node("Relu", ["x"], [""])], [vi("x")], [vi("")])
    if kind == "node_output":
        return model(
            [helper.make_node("Relu", ["x"], [""]), helper.make_node("Neg", [""], ["y"])],
            [vi("x")],
            [vi("y")],
        )
    if kind == "initializer":
        w = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "")
        return model([helper.make_node("Add", ["x", ""], ["y"])], [vi("x")], [vi("y")], [w])
    if kind == "optional_input_skipped":  # valid: Clip with no min
        return model(
            [helper.make_node("Clip", ["x", "", "mx"], ["y"])],
            [vi("x")],
            [vi("y")],
            [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "mx")],
        )
    # required input left empty
    return model([helper.make_node("Add", ["x", ""], ["y"])], [vi("x")], [vi("y")])


for _k in (
    "graph_input",
    "graph_output",
    "node_output",
    "initializer",
    "optional_input_skipped",
    "required_input_empty",
):
    _add("empty_names", _k, writer(lambda k=_k: _empty(k)))
