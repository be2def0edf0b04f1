"""Hostile cases 14-19: subgraphs with outer-scope references, odd names, dtypes, bad
attributes, model-local functions, deep and wide graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt_tests.robustness.build import I64, F, _add, base_bytes, base_model, model, vi, writer

# --- 14. subgraphs with outer-scope references -----------------------------------------------


def _branch(name: str, op: str, inp: str, out: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node(op, [inp], [out])], name, [], [vi(out)])


def _subgraph(kind: str) -> onnx.ModelProto:
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    if kind == "if_outer":
        return model(
            [
                helper.make_node("Identity", ["x"], ["xi"]),
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    then_branch=_branch("t", "Relu", "xi", "ty"),
                    else_branch=_branch("e", "Neg", "xi", "ey"),
                ),
            ],
            [vi("x"), cond],
            [vi("y")],
        )
    if kind == "if_ghost_outer":
        return model(
            [
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    then_branch=_branch("t", "Relu", "ghost", "ty"),
                    else_branch=_branch("e", "Neg", "x", "ey"),
                )
            ],
            [vi("x"), cond],
            [vi("y")],
        )
    if kind == "nested_if":
        inner = helper.make_node(
            "If",
            ["c"],
            ["iy"],
            then_branch=_branch("it", "Relu", "x", "ity"),
            else_branch=_branch("ie", "Identity", "x", "iey"),
        )
        outer_then = helper.make_graph([inner], "ot", [], [vi("iy")])
        return model(
            [
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    then_branch=outer_then,
                    else_branch=_branch("oe", "Neg", "x", "oey"),
                )
            ],
            [vi("x"), cond],
            [vi("y")],
        )
    if kind == "loop_outer":
        w = onnx.numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "w")
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cin"], ["cout"]),
                helper.make_node("Mul", ["s", "w"], ["m"]),
                helper.make_node("Add", ["m", "x"], ["sout"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", I64, []),
                helper.make_tensor_value_info("cin", TensorProto.BOOL, []),
                vi("s"),
            ],
            [helper.make_tensor_value_info("cout", TensorProto.BOOL, []), vi("sout")],
        )
        n = onnx.numpy_helper.from_array(np.array(3, np.int64), "n")
        t = onnx.numpy_helper.from_array(np.array(True), "t")
        return model(
            [helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)],
            [vi("x")],
            [vi("y")],
            [w, n, t],
        )
    if kind == "scan_outer":
        body = helper.make_graph(
            [
                helper.make_node("Add", ["acc", "row"], ["acc2"]),
                helper.make_node("Mul", ["row", "k"], ["out_row"]),
            ],
            "sbody",
            [vi("acc", F, [4]), vi("row", F, [4])],
            [vi("acc2", F, [4]), vi("out_row", F, [4])],
        )
        k = onnx.numpy_helper.from_array(np.full(4, 2.0, np.float32), "k")
        init = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "init")
        return model(
            [helper.make_node("Scan", ["init", "x"], ["acc", "y"], body=body, num_scan_inputs=1)],
            [vi("x", F, [3, 4])],
            [vi("acc", F, [4]), vi("y", F, [3, 4])],
            [k, init],
        )
    if kind == "shadowing":
        # The branch defines a value with the same name as an outer one.
        then_g = helper.make_graph(
            [helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["ty"])],
            "t",
            [],
            [vi("ty")],
        )
        return model(
            [
                helper.make_node("Identity", ["x"], ["t"]),
                helper.make_node(
                    "If",
                    ["c"],
                    ["u"],
                    then_branch=then_g,
                    else_branch=_branch("e", "Neg", "t", "ey"),
                ),
                helper.make_node("Add", ["u", "t"], ["y"]),
            ],
            [vi("x"), cond],
            [vi("y")],
        )
    if kind == "branch_output_count_mismatch":
        two = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
            "t",
            [],
            [vi("a"), vi("b")],
        )
        return model(
            [
                helper.make_node(
                    "If", ["c"], ["y"], then_branch=two, else_branch=_branch("e", "Neg", "x", "ey")
                )
            ],
            [vi("x"), cond],
            [vi("y")],
        )
    # constant subexpression inside a branch that reads an outer initializer
    w = onnx.numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "w")
    then_g = helper.make_graph(
        [
            helper.make_node("Add", ["w", "w"], ["ww"]),
            helper.make_node("Identity", ["ww"], ["wi"]),
            helper.make_node("Mul", ["x", "wi"], ["ty"]),
        ],
        "t",
        [],
        [vi("ty")],
    )
    return model(
        [
            helper.make_node(
                "If", ["c"], ["y"], then_branch=then_g, else_branch=_branch("e", "Relu", "x", "ey")
            )
        ],
        [vi("x"), cond],
        [vi("y")],
        [w],
    )


for _k in (
    "if_outer",
    "if_ghost_outer",
    "nested_if",
    "loop_outer",
    "scan_outer",
    "shadowing",
    "branch_output_count_mismatch",
    "constant_in_branch",
):
    _add("subgraph", _k, writer(lambda k=_k: _subgraph(k)))

# --- 15. non-ASCII and odd names -------------------------------------------------------------

_ODD_NAMES = {
    "cjk": "输入张量",
    "emoji": "x🙂y",
    "rtl": "\u202eevil\u202c",
    "combining": "e\u0301",
    "newline": "a\nb",
    "nul": "a\0b",
    "slash": "../../etc/x",
    "long": "n" * 5000,
    "invalid_utf8_surrogate": "\udcff",
}


def _odd(name: str) -> onnx.ModelProto | bytes:
    proto = base_model()
    renames = {"x": name + "_in", "h": name, "y": name + "_out"}
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.name = name
    for value in (*proto.graph.input, *proto.graph.output):
        value.name = renames.get(value.name, value.name)
    proto.graph.name = name
    return proto


for _label, _name in _ODD_NAMES.items():
    if _label == "invalid_utf8_surrogate":
        continue

    _add("odd_names", _label, writer(lambda n=_name: _odd(n)))


def _invalid_utf8() -> bytes:
    # Protobuf string fields must be UTF-8; write raw bytes that are not.
    data = base_bytes()
    marker = b"\x0a\x01x"  # field 1 (input name) "x" inside a NodeProto / ValueInfoProto
    return data.replace(marker, b"\x0a\x01\xff", 1)


_add("odd_names", "invalid_utf8", writer(_invalid_utf8))

# --- 16. dtypes --------------------------------------------------------------------------


def _dtype_case(dtype: int, op: str = "Identity") -> onnx.ModelProto:
    return model([helper.make_node(op, ["x"], ["y"])], [vi("x", dtype)], [vi("y", dtype)])


_add("dtypes", "undefined", writer(lambda: _dtype_case(0)))
_add("dtypes", "dtype_999", writer(lambda: _dtype_case(999)))
_add("dtypes", "string", writer(lambda: _dtype_case(TensorProto.STRING)))
_add("dtypes", "bfloat16_relu", writer(lambda: _dtype_case(TensorProto.BFLOAT16, "Relu")))
_add("dtypes", "complex64", writer(lambda: _dtype_case(TensorProto.COMPLEX64)))
_add("dtypes", "float8", writer(lambda: _dtype_case(TensorProto.FLOAT8E4M3FN)))
_add("dtypes", "int4", writer(lambda: _dtype_case(TensorProto.INT4)))


def _no_type_input() -> onnx.ModelProto:
    proto = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")])
    proto.graph.input[0].ClearField("type")
    return proto


def _sequence_input() -> onnx.ModelProto:
    seq = helper.make_tensor_sequence_value_info("x", F, [1, 4])
    return model(
        [helper.make_node("SequenceAt", ["x", "i"], ["y"])],
        [seq],
        [vi("y")],
        [onnx.numpy_helper.from_array(np.array(0, np.int64), "i")],
    )


_add("dtypes", "no_type", writer(_no_type_input))
_add("dtypes", "sequence_input", writer(_sequence_input))

# --- 17. bad attributes ------------------------------------------------------------------


def _attr(kind: str) -> onnx.ModelProto:
    if kind == "perm_out_of_range":
        node = helper.make_node("Transpose", ["x"], ["y"], perm=[5, 0])
    elif kind == "perm_wrong_type":
        node = helper.make_node("Transpose", ["x"], ["y"], perm=[1.5, 0.5])
    elif kind == "perm_repeated":
        node = helper.make_node("Transpose", ["x"], ["y"], perm=[0, 0])
    elif kind == "axis_huge":
        node = helper.make_node("Softmax", ["x"], ["y"], axis=2**40)
    elif kind == "missing_required":
        node = helper.make_node("Cast", ["x"], ["y"])
    elif kind == "cast_to_999":
        node = helper.make_node("Cast", ["x"], ["y"], to=999)
    elif kind == "unknown_attribute":
        node = helper.make_node("Relu", ["x"], ["y"], nonsense=3)
    else:  # graph attribute on a non-control-flow op
        node = helper.make_node("Relu", ["x"], ["y"], g=_branch("g", "Neg", "x", "gy"))
    return model([node], [vi("x")], [vi("y")])


for _k in (
    "perm_out_of_range",
    "perm_wrong_type",
    "perm_repeated",
    "axis_huge",
    "missing_required",
    "cast_to_999",
    "unknown_attribute",
    "graph_on_relu",
):
    _add("bad_attributes", _k, writer(lambda k=_k: _attr(k)))


def _reshape_bad(shape: list[int]) -> onnx.ModelProto:
    s = onnx.numpy_helper.from_array(np.array(shape, np.int64), "s")
    return model(
        [helper.make_node("Reshape", ["x", "s"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        [vi("x")],
        [vi("y")],
        [s],
    )


_add("bad_attributes", "reshape_two_minus_one", writer(lambda: _reshape_bad([-1, -1])))
_add("bad_attributes", "reshape_wrong_count", writer(lambda: _reshape_bad([3, 3])))
_add("bad_attributes", "reshape_minus_five", writer(lambda: _reshape_bad([-5, 4])))

# --- 18. model-local functions ---------------------------------------------------------------


def _functions(kind: str) -> onnx.ModelProto:
    fdom = helper.make_opsetid("local", 1)
    std = [helper.make_opsetid("", 17), fdom]
    if kind == "recursive":
        fn = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="local")], std
        )
    elif kind == "mutual":
        g = helper.make_function(
            "local", "G", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="local")], std
        )
        fn = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("G", ["a"], ["b"], domain="local")], std
        )
        return model(
            [helper.make_node("F", ["x"], ["y"], domain="local")],
            [vi("x")],
            [vi("y")],
            extra_opsets=[fdom],
            functions=[fn, g],
        )
    elif kind == "dangling_body":
        fn = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("Add", ["a", "ghost"], ["b"])], std
        )
    elif kind == "duplicate_function":
        fn = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], std
        )
        fn2 = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])], std
        )
        return model(
            [helper.make_node("F", ["x"], ["y"], domain="local")],
            [vi("x")],
            [vi("y")],
            extra_opsets=[fdom],
            functions=[fn, fn2],
        )
    else:  # valid function with identity chains inside
        fn = helper.make_function(
            "local",
            "F",
            ["a"],
            ["b"],
            [
                helper.make_node("Identity", ["a"], ["a1"]),
                helper.make_node("Relu", ["a1"], ["b"]),
            ],
            std,
        )
    return model(
        [helper.make_node("F", ["x"], ["y"], domain="local")],
        [vi("x")],
        [vi("y")],
        extra_opsets=[fdom],
        functions=[fn],
    )


for _k in ("recursive", "mutual", "dangling_body", "duplicate_function", "valid_identity_inside"):
    _add("functions", _k, writer(lambda k=_k: _functions(k)))

# --- 19. deep and wide graphs ----------------------------------------------------------------


def _chain(op: str, length: int) -> onnx.ModelProto:
    nodes = [helper.make_node(op, [f"v{i}"], [f"v{i + 1}"]) for i in range(length)]
    nodes[0].input[0] = "x"
    nodes[-1].output[0] = "y"
    return model(nodes, [vi("x")], [vi("y")])


def _deep_if(depth: int) -> onnx.ModelProto:
    branch = _branch("leaf", "Relu", "x", "leaf_out")
    for level in range(depth):
        node = helper.make_node(
            "If",
            ["c"],
            [f"o{level}"],
            then_branch=branch,
            else_branch=_branch(f"e{level}", "Neg", "x", f"e{level}o"),
        )
        branch = helper.make_graph([node], f"g{level}", [], [vi(f"o{level}")])
    return model(
        list(branch.node),
        [vi("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [vi(branch.output[0].name)],
    )


_add("deep", "identity_chain_3000", writer(lambda: _chain("Identity", 3000)))
_add("deep", "relu_chain_3000", writer(lambda: _chain("Relu", 3000)))
_add("deep", "neg_chain_2000", writer(lambda: _chain("Neg", 2000)))
_add("deep", "nested_if_20", writer(lambda: _deep_if(20)))


def _wide() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], [f"r{i}"]) for i in range(2000)]
    nodes.append(helper.make_node("Sum", [f"r{i}" for i in range(2000)], ["y"]))
    return model(nodes, [vi("x")], [vi("y")])


_add("deep", "wide_2000_duplicates", writer(_wide))
