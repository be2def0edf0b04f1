"""Shape inference at bound input shapes, on a clone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.shapes import bind_input_shapes, infer_shapes, shape_text, static_shape
from graphopt.errors import UserInputError
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model():
    return make_model(
        [
            helper.make_node("MatMul", ["tokens", "w"], ["h"]),
            helper.make_node("Relu", ["image"], ["r"]),
        ],
        [
            tensor_info("tokens", F, ["batch", "seq", 8]),
            tensor_info("image", F, ["n", 3, "h", "w"]),
        ],
        [tensor_info("h", F, ["batch", "seq", 4]), tensor_info("r", F, ["n", 3, "h", "w"])],
        {"w": np.ones((8, 4), np.float32)},
    )


def test_defaults_match_generated_inputs() -> None:
    # Batch 1; other symbolic dims 32 for rank-4 inputs, 16 otherwise (graphopt.inputs).
    assert bind_input_shapes(_model()) == {"tokens": (1, 16, 8), "image": (1, 3, 32, 32)}


def test_inferred_clone_and_untouched_original() -> None:
    model = _model()
    inferred, bound = infer_shapes(model, {"tokens": (2, 5, 8)})
    assert bound["tokens"] == (2, 5, 8)
    values = {n.outputs[0].name: n.outputs[0] for n in inferred.graph}
    assert static_shape(values["h"]) == (2, 5, 4)
    assert static_shape(values["r"]) == (1, 3, 32, 32)
    assert shape_text(model.graph.outputs[0].shape) == ["batch", "seq", 4]
    assert static_shape(model.graph.outputs[0]) is None
    # Tensors are shared, not copied.
    assert inferred.graph.initializers["w"].const_value is model.graph.initializers["w"].const_value


def test_bad_bindings() -> None:
    with pytest.raises(UserInputError, match="unknown input"):
        bind_input_shapes(_model(), {"nope": (1,)})
    with pytest.raises(UserInputError, match="rank 2 does not match"):
        bind_input_shapes(_model(), {"tokens": (1, 2)})


def test_input_without_shape_is_left_unbound() -> None:
    model = _model()
    model.graph.inputs[0].shape = None
    assert "tokens" not in bind_input_shapes(model)
    assert bind_input_shapes(model, {"tokens": (1, 2, 8)})["tokens"] == (1, 2, 8)


def _flatten_chain(blocks: int):
    """x [batch, 8] → com.microsoft QuickGelu → ``blocks`` × (flatten by ReduceProd(Shape),
    Reshape to (-1, 8), Relu) → MatMul by [8, 4].

    onnx infers nothing past the contrib op, nor a Reshape to ReduceProd(Shape(v)) ever: the
    first folding round has nothing to fold (the stand-in's shape is not inferred yet), and
    every block needs one more round. ppocr_rec after ``quantize --target ort`` is such a
    graph: three rounds, the first of which ended the loop, left its MatMuls uncounted."""
    nodes = [helper.make_node("QuickGelu", ["x"], ["g0"], domain="com.microsoft")]
    for i in range(blocks):
        nodes += [
            helper.make_node("Shape", [f"g{i}"], [f"s{i}"]),
            helper.make_node("ReduceProd", [f"s{i}"], [f"n{i}"], keepdims=1),
            helper.make_node("Reshape", [f"g{i}", f"n{i}"], [f"f{i}"]),
            helper.make_node("Reshape", [f"f{i}", "rows"], [f"u{i}"]),
            helper.make_node("Relu", [f"u{i}"], [f"g{i + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"g{blocks}", "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [tensor_info("x", F, ["batch", 8])],
        [helper.make_tensor_value_info("y", F, None)],
        [
            numpy_helper.from_array(np.ones((8, 4), np.float32), "w"),
            numpy_helper.from_array(np.array([-1, 8], np.int64), "rows"),
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    from graphopt.io import load

    return load(helper.make_model(graph, opset_imports=opsets, ir_version=9)).model


@pytest.mark.parametrize("blocks", [1, 6])
def test_folding_goes_on_while_it_makes_progress(blocks: int) -> None:
    inferred, _ = infer_shapes(_flatten_chain(blocks), {"x": (3, 8)})
    shapes = {o.name: static_shape(o) for node in inferred.graph for o in node.outputs}
    assert shapes["y"] == (3, 4)
    for i in range(blocks):
        # The values folded away on the way keep their shapes too (a Shape's, a ReduceProd's).
        assert (shapes[f"s{i}"], shapes[f"n{i}"], shapes[f"f{i}"]) == ((2,), (1,), (24,))
        assert shapes[f"g{i + 1}"] == (3, 8)


def test_reinfer_after_an_edit_keeps_names_and_confirmed_ints_and_drops_stale_ones() -> None:
    """x [batch, seq, 8] → MatMul → h → Reshape(h, Concat(Shape(h)[:2], [2, -1])) → t. A
    rewrite shrinks the weight 8x6 → 8x4: h's declared 6 is stale; the names and the head
    count 2 (which onnx inference alone cannot find past the -1) stay."""
    from graphopt.analysis.shapes import reinfer_shapes
    from graphopt.io import load

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"], end=2),
        helper.make_node("Concat", ["s", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["heads"]),
        helper.make_node("Relu", ["heads"], ["t"]),
    ]
    graph = helper.make_graph(
        nodes,
        "edit",
        [tensor_info("x", F, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("t", F, None)],
        [
            numpy_helper.from_array(np.ones((8, 6), np.float32), "w"),
            numpy_helper.from_array(np.array([2, -1], np.int64), "tail"),
        ],
        value_info=[
            helper.make_tensor_value_info("h", F, ["batch", "seq", 6]),
            helper.make_tensor_value_info("heads", F, ["batch", "seq", 2, 3]),
        ],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).model
    model.graph.initializers["w"].const_value = ir.tensor(np.ones((8, 4), np.float32), name="w")
    model.graph.initializers["w"].shape = ir.Shape([8, 4])
    reinfer_shapes(model)
    shapes = {o.name: shape_text(o.shape) for node in model.graph for o in node.outputs}
    assert shapes["h"] == ["batch", "seq", 4]
    # The head size: the stale 3 is gone (inference can only make a name up for it).
    assert shapes["heads"][:3] == ["batch", "seq", 2] and not isinstance(shapes["heads"][3], int)


def test_folding_noise_is_quieted_in_the_folding_thread_only(caplog) -> None:
    """The folder's logger level was lowered and restored process-wide: with concurrent
    runs (the Python API from threads), one run's restore let another's "Evaluation failed"
    warnings through, and while one run folded, another thread's warnings were dropped."""
    import logging
    import threading

    from graphopt.analysis.shapes import _folding_quietly

    noisy = logging.getLogger("graphopt_tests.folding_noise")
    caplog.set_level(logging.WARNING, logger=noisy.name)
    inside, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait()
        noisy.warning("from another thread")
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with _folding_quietly(noisy):
        noisy.warning("while folding")
        inside.set()
        done.wait()
    worker.join()
    noisy.warning("after folding")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["from another thread", "after folding"]
    assert noisy.level == logging.NOTSET or noisy.level == logging.WARNING
