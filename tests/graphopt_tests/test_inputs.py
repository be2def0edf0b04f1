"""Generated inputs that exercise the model, and ``--verify-inputs`` for the user's own data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.input_dims import batch_dims
from graphopt.inputs import (
    ENLARGE_MAX_BYTES,
    ENLARGE_TRIES,
    SAMPLE_RATE,
    _mask_array,
    bind_dims,
    distinct_second_dims,
    enlarged_dims,
    input_shapes,
    make_inputs,
    second_shape_candidates,
)
from graphopt.recipe import recipe_from_dict
from graphopt.verify import VerificationUnavailable, Verifier, run_model
from graphopt_tests.helpers import make_model, tensor_info

F, I64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _text_model():
    """ids[batch, seq] → Gather(table of 50 rows) + pos[batch, seq] → Gather(8 rows); a
    rank-4 bias[batch, 1, seq, seq] added to scores; mask[batch, seq] multiplies."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tok"]),
        helper.make_node("Gather", ["positions", "pos"], ["p"]),
        helper.make_node("Add", ["tok", "p"], ["h"]),  # [b, s, 4]
        helper.make_node("MatMul", ["h", "hT"], ["scores"]),  # [b, s, s]
        helper.make_node("Unsqueeze", ["scores", "one"], ["s4"]),  # [b, 1, s, s]
        helper.make_node("Add", ["s4", "bias"], ["biased"]),
        helper.make_node("Cast", ["mask"], ["m"], to=F),
        helper.make_node("Unsqueeze", ["m", "one_two"], ["m4"]),  # [b, 1, 1, s]
        helper.make_node("Mul", ["biased", "m4"], ["y"]),
        helper.make_node("Transpose", ["h"], ["hT"], perm=[0, 2, 1]),
    ]
    # Topological order for the checker: Transpose before MatMul.
    nodes.insert(3, nodes.pop())
    return make_model(
        nodes,
        [
            tensor_info("ids", I64, ["batch", "seq"]),
            tensor_info("pos", I64, ["batch", "seq"]),
            tensor_info("bias", F, ["batch", 1, "seq", "seq"]),
            tensor_info("mask", I64, ["batch", "seq"]),
        ],
        [tensor_info("y", F, ["batch", 1, "seq", "seq"])],
        {
            "table": rng.standard_normal((50, 4)).astype(np.float32),
            "positions": rng.standard_normal((8, 4)).astype(np.float32),
            "one": np.array([1], np.int64),
            "one_two": np.array([1, 2], np.int64),
        },
    )


def test_one_value_per_named_dim_across_inputs() -> None:
    model = _text_model()
    feeds = make_inputs(model)
    # `seq` is first seen on a rank-2 input (16), capped by the 8-row position table: every
    # input that names it gets the same value, the rank-4 `bias` included (not 32).
    assert {k: v.shape for k, v in feeds.items()} == {
        "ids": (1, 8),
        "pos": (1, 8),
        "bias": (1, 1, 8, 8),
        "mask": (1, 8),
    }
    # A shape given for one input binds its named dims for the others.
    shapes = input_shapes(model, {"ids": (2, 5)})
    assert shapes == {"ids": (2, 5), "pos": (2, 5), "bias": (2, 1, 5, 5), "mask": (2, 5)}
    Verifier(model, {"ids": (2, 5)})  # ORT runs the original on them


def test_integer_inputs_take_values_the_model_can_use() -> None:
    model = _text_model()
    feeds = make_inputs(model, {"ids": (3, 6)}, seed=4)
    # Ids of a constant 50-row table span it, past the [0, 10) of other integers.
    assert feeds["ids"].min() >= 0 and 10 <= feeds["ids"].max() < 50
    # Position ids count along the sequence, as a tokenizer feeds them.
    np.testing.assert_array_equal(feeds["pos"], np.broadcast_to(np.arange(6), (3, 6)))
    # The mask's second row is left-padded to its last position (fully masked query rows).
    np.testing.assert_array_equal(feeds["mask"], [[1] * 6, [0, 0, 0, 0, 0, 1], [1] * 6])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_masks_left_pad_one_row_of_a_batch(dtype) -> None:
    # All ones never masks a whole query row: a rewrite wrong only on padding rows (an
    # attention fusion on a left-padded prompt) would verify. Batch 1 keeps all ones.
    assert _mask_array((1, 5), np.dtype(dtype)).all()
    mask = _mask_array((2, 3, 5), np.dtype(dtype))
    assert mask.dtype == dtype and mask[0].all() and mask[1, :, -1].all()
    assert not mask[1, :, :-1].any()
    assert _mask_array((2, 1), np.dtype(dtype)).all()  # one position: never masked away


def test_boolean_masks_stay_random() -> None:
    # A bool mask's polarity is unknown (True may mean padded): not generated as a 0/1 mask.
    model = make_model(
        [helper.make_node("Cast", ["attn_mask"], ["y"], to=TensorProto.FLOAT)],
        [tensor_info("attn_mask", TensorProto.BOOL, ["batch", 64])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 64])],
    )
    feeds = make_inputs(model, {"attn_mask": (2, 64)}, seed=3)
    assert feeds["attn_mask"].dtype == np.bool_ and 0 < feeds["attn_mask"].sum() < 128


def _lookup_model(table: str = "const", types: bool = False) -> ir.Model:
    """ids[b, s] → Cast → Reshape → Gather(emb, 300 rows) (``types``: and → Gather(2 rows));
    idx[b, s] → Gather(x, axis 1), a computed tensor; n[b, s] only summed.

    ``table``: ``const`` an initializer, ``node`` a Constant node, ``dq`` an int8 table
    behind DequantizeLinear, ``input`` the embedding fed as a model input (not fixed)."""
    rng = np.random.default_rng(0)
    initializers = {
        "types": rng.standard_normal((2, 4)).astype(np.float32),
        "flat": np.array([-1], np.int64),
    }
    inputs = [
        tensor_info("ids", I64, ["b", "s"]),
        tensor_info("idx", I64, ["b", "s"]),
        tensor_info("n", I64, ["b", "s"]),
        tensor_info("x", F, ["b", 40]),
    ]
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["ids32", "flat"], ["flat_ids"]),
        helper.make_node("Gather", ["emb", "flat_ids"], ["tok"]),
        helper.make_node("Gather", ["x", "idx"], ["picked"], axis=1),
        helper.make_node("ReduceSum", ["n"], ["total"], keepdims=0),
    ]
    weights = rng.standard_normal((300, 4)).astype(np.float32)
    if table == "dq":
        initializers["emb_q"] = np.clip(weights * 40, -127, 127).astype(np.int8)
        initializers["emb_scale"] = np.array(0.025, np.float32)
        nodes.insert(0, helper.make_node("DequantizeLinear", ["emb_q", "emb_scale"], ["emb"]))
    elif table == "node":
        tensor = onnx.numpy_helper.from_array(weights, "emb")
        nodes.insert(0, helper.make_node("Constant", [], ["emb"], value=tensor))
    elif table == "input":
        inputs.append(tensor_info("emb", F, [300, 4]))
    else:
        initializers["emb"] = weights
    outputs = [
        tensor_info("tok", F, ["t", 4]),
        tensor_info("picked", F, ["b", "b2", "s"]),
        tensor_info("total", I64, []),
    ]
    if types:
        nodes.append(helper.make_node("Gather", ["types", "ids"], ["typ"]))
        outputs.append(tensor_info("typ", F, ["b", "s", 4]))
    return make_model(nodes, inputs, outputs, initializers)


def test_ids_of_two_tables_stay_in_the_smaller() -> None:
    """ids index a 300-row embedding (through Cast/Reshape) and a 2-row table: they take the
    smallest table's range (token-type ids)."""
    model = _lookup_model(types=True)
    feeds = make_inputs(model, {"ids": (4, 64)}, seed=3)
    assert set(np.unique(feeds["ids"])) == {0, 1}  # the 2-row table bounds it
    # Indices into a computed tensor and plain integers keep [0, 10).
    assert feeds["idx"].min() >= 0 and feeds["idx"].max() <= 9
    assert feeds["n"].min() >= 0 and feeds["n"].max() <= 9
    run_model(model, feeds)


@pytest.mark.parametrize("table", ["const", "node", "dq"])
def test_token_ids_span_the_vocabulary(table: str) -> None:
    """Ids of a constant embedding (an initializer, a Constant, int8 behind DequantizeLinear)
    read all of it:
    a rewrite that broke row 10 on would pass on ids in [0, 10)."""
    model = _lookup_model(table)
    first = make_inputs(model, {"ids": (4, 64)}, seed=3)
    ids = first["ids"]
    assert ids.min() >= 0 and ids.max() < 300
    # 256 draws from [0, 300): nearly every stretch of the table is read.
    assert len(np.unique(ids // 30)) == 10 and ids.max() >= 250
    np.testing.assert_array_equal(make_inputs(model, {"ids": (4, 64)}, seed=3)["ids"], ids)
    run_model(model, first)


def test_ids_of_a_fed_table_stay_small() -> None:
    """A table the caller feeds is not fixed: its ids keep [0, 10)."""
    model = _lookup_model("input")
    feeds = make_inputs(model, {"ids": (4, 64)}, seed=3)
    assert feeds["ids"].max() <= 9


def test_lengths_and_sample_rate() -> None:
    model = make_model(
        [
            helper.make_node("Cast", ["lengths"], ["lf"], to=F),
            helper.make_node("Cast", ["sample_rate"], ["rf"], to=F),
            helper.make_node("ReduceSum", ["audio"], ["total"], keepdims=0),
            helper.make_node("Add", ["lf", "rf"], ["lr"]),
            helper.make_node("Add", ["lr", "total"], ["y"]),
        ],
        [
            tensor_info("audio", F, ["batch", "frames", 80]),
            tensor_info("lengths", I64, ["batch"]),
            tensor_info("sample_rate", I64, []),
        ],
        [tensor_info("y", F, ["batch"])],
    )
    feeds = make_inputs(model, {"audio": (64, 12, 80)}, seed=1)
    # Lengths measure the longest symbolic dim of the others (frames = 12, not the 80
    # features): within [1, 12], and varied.
    assert feeds["lengths"].shape == (64,)
    assert feeds["lengths"].min() >= 1 and feeds["lengths"].max() <= 12
    assert len(set(feeds["lengths"].tolist())) > 3
    assert int(feeds["sample_rate"]) == SAMPLE_RATE


def test_default_dims_are_large_enough_for_windows() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["image", "w"], ["c"]),  # 40x40 kernel, no padding
            helper.make_node("ReduceMean", ["c"], ["a"], keepdims=0),
            helper.make_node("Pad", ["signal", "pads"], ["padded"], mode="reflect"),
            helper.make_node("ReduceMean", ["padded"], ["b"], keepdims=0),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [tensor_info("image", F, ["n", 1, "h", "w_"]), tensor_info("signal", F, [1, "t"])],
        [tensor_info("y", F, [])],
        {
            "w": rng.standard_normal((2, 1, 40, 40)).astype(np.float32),
            "pads": np.array([0, 20, 0, 20], np.int64),  # reflect 20 on t: t must be >= 21
        },
    )
    Verifier(model)  # the default shapes run; 32x32 and 16 would not
    dims = bind_dims(model)
    assert dims == {"n": 1, "h": 40, "w_": 40, "t": 21}
    # Second-shape values never go below what the windows need.
    candidates = second_shape_candidates(model, dims)
    assert all(v >= 40 for v in candidates["h"]) and all(v >= 21 for v in candidates["t"])


def test_stft_frame_sets_the_signal_length() -> None:
    model = make_model(
        [helper.make_node("STFT", ["signal", "step", "", "frame"], ["y"], onesided=1)],
        [tensor_info("signal", F, ["batch", "samples", 1])],
        [tensor_info("y", F, ["batch", "frames", 201, 2])],
        {"step": np.array(160, np.int64), "frame": np.array(400, np.int64)},
        opset=17,
    )
    Verifier(model)  # 16 samples would not fill one 400-sample frame
    assert bind_dims(model) == {"batch": 1, "samples": 400}


def test_second_shape_candidates_keep_divisibility_and_limits() -> None:
    model = _text_model()
    candidates = second_shape_candidates(model, {"batch": 1, "seq": 8})
    # seq indexes an 8-row position table: it can only go down.
    assert candidates == {"batch": [2], "seq": [4]}
    image = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, ["n", 3, "?", "?"])],  # paddle2onnx's "unknown": two dims
        [tensor_info("y", F, ["n", 3, "?", "?"])],
    )
    dims = bind_dims(image, {"x": (1, 3, 224, 320)})
    assert dims == {"n": 1, "x[2]": 224, "x[3]": 320}
    assert second_shape_candidates(image, dims) == {
        "n": [2],
        "x[2]": [192, 256, 448, 112],  # 224 = 7 * 32: down by 32 first
        "x[3]": [288, 352, 640, 160],
    }


def test_distinct_dims_take_distinct_second_values() -> None:
    """Equal dims at the first shape part at the second: the first of a group moves by its
    step; the next ones first to further multiples of it (½× would break a stride's
    divisibility), else to the candidates in order (dims that divide one another)."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, ["N", "S", "T", "U"])],
        [tensor_info("y", F, ["N", "S", "T", "U"])],
    )
    dims = {"N": 1, "S": 16, "T": 16, "U": 16}
    candidates = second_shape_candidates(model, dims)
    assert candidates == {"N": [2], "S": [32, 8], "T": [32, 8], "U": [32, 8]}
    assert distinct_second_dims(model, dims, candidates) == [
        {"N": 2, "S": 32, "T": 48, "U": 64},
        {"N": 2, "S": 32, "T": 8, "U": 48},
    ]
    # A dim with no other value holds its own: the others avoid it.
    fixed = {**candidates, "S": []}
    assert distinct_second_dims(model, dims, fixed) == [
        {"N": 2, "T": 32, "U": 48},
        {"N": 2, "T": 32, "U": 8},
    ]
    # Apart at the first shape, their steps would meet at 32 (48 - 16, 64 - 32): kept
    # apart, one binding when both orders agree.
    apart = {"N": 1, "S": 16, "T": 48, "U": 64}
    assert distinct_second_dims(model, apart, second_shape_candidates(model, apart)) == [
        {"N": 2, "S": 32, "T": 64, "U": 96}
    ]


def test_a_dim_the_model_fixes_in_practice_is_kept_and_reported() -> None:
    """Reshape x[n, h, 8] to [n, 64] (0 copies n): n may change, h must stay 8."""
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "target"], ["flat"]),
            helper.make_node("ReduceSum", ["flat", "axis"], ["y"], keepdims=0),
        ],
        [tensor_info("x", F, ["n", "h", 8])],
        [tensor_info("y", F, ["n2"])],
        {"target": np.array([0, 64], np.int64), "axis": np.array([1], np.int64)},
    )
    verifier = Verifier(model, {"x": (1, 8, 8)})
    assert [f["x"].shape for f in verifier.input_sets] == [(1, 8, 8), (2, 8, 8)]
    assert verifier.shape_note.startswith("h kept at one value")


def test_rejected_generated_inputs_name_the_input_shape_and_fix(tmp_path: Path, capsys) -> None:
    """idx + 5 indexes a 8-row table: generated indices in [0, 10) fail in ORT."""
    model = make_model(
        [
            helper.make_node("Add", ["idx", "five"], ["shifted"]),
            helper.make_node("Gather", ["table", "shifted"], ["y"]),
        ],
        [tensor_info("idx", I64, ["batch", "seq"])],
        [tensor_info("y", F, ["batch", "seq", 2])],
        {"table": np.ones((8, 2), np.float32), "five": np.array(5, np.int64)},
    )
    source = tmp_path / "m.onnx"
    io.save(model, source)
    main(["optimize", str(source), "-o", str(tmp_path / "o.onnx")])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "not verified" in text
    assert "idx 1x16 int64 in [0, 9]" in text
    # Larger sizes were tried too (the batch never), and the message says so.
    assert "also fails with seq up to 65536 (6 larger sizes tried)" in " ".join(text.split())
    assert "--input-shape" in text and "--verify-inputs FILE.npz" in text
    # The fix works: the user's own data verifies.
    data = tmp_path / "data.npz"
    np.savez(data, idx=np.array([[0, 1, 2], [2, 1, 0]], np.int64))
    code = main(
        ["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--verify-inputs", str(data)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "verification passed" in out
    # The second shape is cut and tiled from the user's data (generated ids would fail).
    assert "batch=2, seq=3: idx 2x3 | batch=4, seq=2: idx 4x2" in out


def _two_input_file(tmp_path: Path) -> Path:
    """y = x * Cast(mask): x[batch, 4] float, mask[batch, 4] int64."""
    model = make_model(
        [
            helper.make_node("Cast", ["mask"], ["m"], to=F),
            helper.make_node("Mul", ["x", "m"], ["y"]),
        ],
        [tensor_info("x", F, ["batch", 4]), tensor_info("mask", I64, ["batch", 4])],
        [tensor_info("y", F, ["batch", 4])],
    )
    path = tmp_path / "m.onnx"
    io.save(model, path)
    return path


def test_verify_inputs_runs_on_the_users_data(tmp_path: Path, capsys) -> None:
    source = _two_input_file(tmp_path)
    data = tmp_path / "data.npz"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(data, x=x, mask=np.ones((3, 4), np.int64))
    code = main(["optimize", str(source), "--verify-inputs", str(data)])
    out = capsys.readouterr().out
    assert code == 0, out
    # The user's shape first, then a generated second shape.
    assert "checked at 2 input shapes: batch=3: x 3x4, mask 3x4 | batch=2: x 2x4" in out
    verifier = Verifier(io.load(source).model, feeds={"x": x, "mask": np.ones((3, 4), np.int64)})
    np.testing.assert_array_equal(verifier.input_sets[0]["x"], x)
    # API field and recipe key.
    result = optimize(source, None, OptimizeOptions(verify_inputs=data))
    assert result.report.verification.ok
    assert result.report.verification.shapes[0] == "batch=3: x 3x4, mask 3x4"
    assert recipe_from_dict({"verify_inputs": str(data)}).verify_inputs == str(data)
    with pytest.raises(UserInputError, match="verify_inputs is the path"):
        recipe_from_dict({"verify_inputs": 3})


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((2, 4), np.float32)}, "no array for model input(s) mask"),
        (
            {"x": np.ones((2, 4), np.float32), "mask": np.ones((2, 4), np.int64), "z": np.ones(1)},
            "array(s) z are not model inputs (x, mask)",
        ),
        (
            {"x": np.ones((2, 4), np.float64), "mask": np.ones((2, 4), np.int64)},
            "input 'x' is float64, the model expects float32",
        ),
        (
            {"x": np.ones((2, 5), np.float32), "mask": np.ones((2, 5), np.int64)},
            "input 'x' has shape 2x5, the model expects [batch,4]",
        ),
        (
            {"x": np.ones((2, 4), np.float32), "mask": np.ones((3, 4), np.int64)},
            "dim 'batch' is 2 in input 'x' but 3 in 'mask'",
        ),
    ],
)
def test_verify_inputs_that_do_not_match_are_exit_2(
    tmp_path: Path, capsys, arrays: dict, message: str
) -> None:
    source = _two_input_file(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    code = main(["optimize", str(source), "--verify-inputs", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.opt.onnx").exists()


def test_verify_inputs_refuses_pickles_and_no_verify(tmp_path: Path, capsys) -> None:
    source = _two_input_file(tmp_path)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), mask=np.ones((1, 4), np.int64))
    code = main(["optimize", str(source), "--verify-inputs", str(pickled)])
    assert code == 2 and "pickled" in capsys.readouterr().err
    code = main(["optimize", str(source), "--verify-inputs", str(tmp_path / "missing.npz")])
    assert code == 2 and "no such verification inputs file" in capsys.readouterr().err
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((1, 4), np.float32), mask=np.ones((1, 4), np.int64))
    code = main(["optimize", str(source), "--verify-inputs", str(data), "--no-verify"])
    assert code == 2 and "contradict" in capsys.readouterr().err


def test_rejection_message_calls_out_the_input_ort_names() -> None:
    from graphopt.verify import _rejected

    feeds = {"x": np.zeros((1, 3, 32, 32), np.float32), "ids": np.zeros((1, 16), np.int64)}
    named = _rejected(RuntimeError("Got invalid dimensions for input: x for the ..."), feeds, None)
    assert "input 'x' was x 1x3x32x32 float32; generated inputs:" in named
    # "idx=13" in an index error names no input.
    index = _rejected(RuntimeError("out of data bounds, idx=13"), {"idx": feeds["ids"]}, None)
    assert "was" not in index and "generated inputs: idx 1x16 int64 in [0, 0]" in index


def test_no_second_value_is_said_not_invented() -> None:
    """Position ids index a 1-row table: seq can only be 1, and batch is fixed."""
    model = make_model(
        [helper.make_node("Gather", ["table", "position_ids"], ["y"])],
        [tensor_info("position_ids", I64, [1, "seq"])],
        [tensor_info("y", F, [1, "seq", 4])],
        {"table": np.ones((1, 4), np.float32)},
    )
    verifier = Verifier(model)
    assert len(verifier.input_sets) == 1
    result = verifier.check(model)
    assert result.shapes == ["seq=1: position_ids 1x1"]
    assert result.shape_note == "one shape only: no other value the graph allows for seq"


# ---- sizes the model runs at: batch dims joined, windows out of sight, calibration ----------


def _signal_in_if(reflect: int = 40):
    """silero-vad in miniature: ``signal[?, ?]``, ``state[2, ?, 8]`` and a scalar ``sr``, all
    dims unnamed. ``If(sr == 16000)`` reflect-pads ``Unsqueeze(signal)`` by ``reflect``
    samples (20 in the other branch): a window :func:`dim_limits` cannot see, behind an
    Unsqueeze and inside a branch. The state is concatenated with one value per batch row,
    so its ``?`` must be the signal's batch."""
    then_branch, else_branch = (
        helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["signal", "axis1"], [f"{tag}_u"]),
                helper.make_node("Pad", [f"{tag}_u", f"{tag}_pads"], [f"{tag}_p"], mode="reflect"),
                helper.make_node("ReduceMean", [f"{tag}_p", "axes12"], [f"{tag}_m"], keepdims=0),
            ],
            tag,
            [],
            [tensor_info(f"{tag}_m", F, [None])],
            [
                helper.make_tensor(
                    f"{tag}_pads", I64, [6], [0, 0, 0, 0, 0, pad]
                )  # reflect on the sample axis only
            ],
        )
        for tag, pad in (("then", reflect), ("else", reflect // 2))
    )
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node(
            "If", ["is16k"], ["level"], then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Reshape", ["level", "row"], ["column"]),  # [1, B, 1]
        helper.make_node("Expand", ["column", "two"], ["per_layer"]),  # [2, B, 1]
        helper.make_node("Concat", ["state", "per_layer"], ["state_out"], axis=2),
    ]
    return make_model(
        nodes,
        [
            tensor_info("signal", F, [None, None]),
            tensor_info("state", F, [2, None, 8]),
            tensor_info("sr", I64, []),
        ],
        [tensor_info("level", F, [None]), tensor_info("state_out", F, [2, None, 9])],
        {
            "rate": np.array(SAMPLE_RATE, np.int64),
            "axis1": np.array([1], np.int64),
            "axes12": np.array([1, 2], np.int64),
            "row": np.array([1, -1, 1], np.int64),
            "two": np.array([2, 1, 1], np.int64),
        },
        opset=18,  # ReduceMean's axes as an input
    )


def test_unnamed_batch_dims_are_one_dim() -> None:
    """A recurrent state's unnamed ``B`` is the signal's unnamed batch: one value, bound by
    either, never the 16 of a sequence (ORT's Concat/LSTM fail on a state batch of 16)."""
    model = _signal_in_if()
    assert batch_dims(model) == {"signal[0]"}
    assert bind_dims(model) == {"signal[0]": 1, "signal[1]": 16}
    assert input_shapes(model)["state"] == (2, 1, 8)
    assert input_shapes(model, {"signal": (3, 100)}) == {
        "signal": (3, 100),
        "state": (2, 3, 8),
        "sr": (),
    }


def test_generated_inputs_are_enlarged_until_the_original_runs(tmp_path: Path, capsys) -> None:
    model = _signal_in_if()
    verifier = Verifier(model)
    # 16 samples cannot be reflect-padded by 40; x4 gives 64, which can. The batch stays 1.
    assert verifier.input_sets[0]["signal"].shape == (1, 64)
    assert verifier.input_sets[0]["state"].shape == (2, 1, 8)
    assert verifier.shape_note.startswith("generated inputs enlarged: signal[1] 16 -> 64 (x4 per")
    assert "Pad reflect" in verifier.shape_note and "--input-shape" in verifier.shape_note
    # The second shape moves the batch in both inputs together.
    assert len(verifier.input_sets) == 2
    second = verifier.input_sets[1]
    assert second["state"].shape[1] == second["signal"].shape[0] == 2
    # The CLI verifies it (exit 0) and says at which shape and why.
    source = tmp_path / "m.onnx"
    io.save(model, source)
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx")])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long notes
    assert code == 0, out
    assert "checked at 2 input shapes: signal[0]=1, signal[1]=64: signal 1x64, state 2x1x8" in out
    assert "note: generated inputs enlarged: signal[1] 16 -> 64" in out


def test_only_sizes_the_user_leaves_free_are_enlarged() -> None:
    # Binding the state binds the batch (2, through the unnamed-batch join), not the signal's
    # length: that is enlarged, the batch kept.
    verifier = Verifier(_signal_in_if(), {"state": (2, 2, 8)})
    assert verifier.input_sets[0]["signal"].shape == (2, 64)
    # A length the user gives is used as given: ORT's rejection is the answer, with the fix.
    with pytest.raises(VerificationUnavailable, match="Pad reflect") as caught:
        Verifier(_signal_in_if(), {"signal": (1, 16)})
    message = str(caught.value)
    assert "also fails" not in message and "--input-shape" in message and "\n" not in message


def test_enlarged_dims_keep_batches_and_stop_at_the_cap() -> None:
    model = _signal_in_if()
    steps = enlarged_dims(model, {}, bind_dims(model))
    assert [s["signal[1]"] for s in steps] == [16 * 4**k for k in range(1, ENLARGE_TRIES + 1)]
    assert all(s["signal[0]"] == 1 for s in steps)  # a batch repeats work, fills no window
    image = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, ["n", 3, "h", "w"])],
        [tensor_info("y", F, ["n", 3, "h", "w"])],
    )
    steps = enlarged_dims(image, {}, bind_dims(image))
    # 1x3x2048x2048 float32 (48 MiB) would pass ENLARGE_MAX_BYTES: 128 and 512 only.
    assert [(s["n"], s["h"], s["w"]) for s in steps] == [(1, 128, 128), (1, 512, 512)]
    assert 3 * 2048 * 2048 * 4 > ENLARGE_MAX_BYTES >= 3 * 512 * 512 * 4
    # Sizes the user gives stay; nothing left to enlarge, nothing to try.
    given = {"x": (1, 3, 64, 64)}
    assert enlarged_dims(image, given, bind_dims(image, given)) == []


def test_random_calibration_uses_the_sizes_the_model_runs_at() -> None:
    from graphopt.passes.calibration.samples import random_calibration

    model = _signal_in_if()
    calib = random_calibration(model, {})
    assert calib.sample_shapes() == {"signal": (1, 64), "state": (2, 1, 8), "sr": ()}
    assert calib.note.startswith("--calib random: samples enlarged (signal[1] 16 -> 64)")
    for feeds in calib.batches():
        run_model(model, feeds)  # every batch runs in ORT
    # The sizes verification found (the run passes them as shapes) are used as they are.
    calib = random_calibration(model, {"signal": (1, 64), "state": (2, 1, 8), "sr": ()})
    assert calib.sample_shapes()["signal"] == (1, 64) and calib.note == ""


def test_random_calibration_feeds_one_sample_where_a_batch_fails() -> None:
    """Reshape(x, [1, 16]): the batch is declared free, yet only 1 runs."""
    from graphopt.passes.calibration.samples import random_calibration

    model = make_model(
        [helper.make_node("Reshape", ["x", "one_row"], ["y"])],
        [tensor_info("x", F, ["batch", 16])],
        [tensor_info("y", F, [1, 16])],
        {"one_row": np.array([1, 16], np.int64)},
    )
    calib = random_calibration(model, {})
    assert calib.batch == 1 and calib.count == 32
    assert "fed one at a time" in calib.note
    run_model(model, next(calib.batches()))


def _prunable_with_bad_indices():
    """y = Relu(x·w1)·w2 (prunable hidden units) and z = Gather(table[8], idx + 5): generated
    indices in [0, 10) fail in ORT at any size."""
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["y"]),
            helper.make_node("Add", ["idx", "five"], ["shifted"]),
            helper.make_node("Gather", ["table", "shifted"], ["z"]),
        ],
        [tensor_info("x", F, ["batch", 16]), tensor_info("idx", I64, ["batch", "seq"])],
        [tensor_info("y", F, ["batch", 8]), tensor_info("z", F, ["batch", "seq", 2])],
        {
            "w1": rng.standard_normal((16, 32)).astype(np.float32),
            "w2": rng.standard_normal((32, 8)).astype(np.float32),
            "table": np.ones((8, 2), np.float32),
            "five": np.array(5, np.int64),
        },
    )


@pytest.mark.parametrize("verify", [[], ["--no-verify"]])
def test_calibration_the_model_rejects_is_exit_2_in_one_line(
    tmp_path: Path, capsys, verify: list[str]
) -> None:
    source = tmp_path / "m.onnx"
    io.save(_prunable_with_bad_indices(), source)
    args = ["optimize", str(source), "--prune", "flops=0.3", "--calib", "random", *verify]
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: prune: ONNX Runtime cannot")
    assert "inputs (x 1x16 float32, idx 1x16 int64 in [" in lines[0]
    assert "--input-shape" in lines[0] and "--calib FILE.npz" in lines[0]


def test_a_sequence_input_is_said_to_be_no_tensor() -> None:
    """It was told to pass --input-shape, which cannot help."""
    import onnx_ir as ir
    import pytest
    from onnx import TensorProto, helper

    from graphopt.errors import UserInputError
    from graphopt.inputs import make_inputs

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, None)],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    with pytest.raises(UserInputError, match=r"is not a tensor .*--no-verify"):
        make_inputs(model, {})


def test_an_input_listed_as_a_bare_output_keeps_its_shape(tmp_path: Path, capsys) -> None:
    """x[N, 4] is also a graph output entry without a shape (and o is listed twice): reading
    the model used to let that entry erase x's shape, and the run stopped saying x had none;
    x keeps its declared shape and the model is optimized and verified like any other."""
    untyped = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["o"])],
        "dup_out",
        [tensor_info("x", F, ["N", 4])],
        [untyped("o", F, None), untyped("o", F, None), untyped("x", F, None)],
    )
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "verification passed" in out


def test_generated_mask_length_follows_past_plus_sequence() -> None:
    """A mask dim named ``past_sequence_length + sequence_length`` (optimum, TorchScript) is
    bound as the sum of its terms at the first shape, at any binding that moves them (the
    second shape), and around a given mask length (the past is what is left)."""
    from graphopt.inputs import bind_dims, input_shapes
    from graphopt_tests.test_dim_expressions import MASK, _decoder

    model = _decoder()
    dims = bind_dims(model)
    assert dims[MASK] == dims["past_sequence_length"] + dims["sequence_length"]
    moved = {**dims, "sequence_length": 3, "past_sequence_length": 16, MASK: 7}
    assert input_shapes(model, {}, moved)["attention_mask"] == (dims["batch_size"], 19)
    given = {"input_ids": (1, 1), "attention_mask": (1, 9)}
    assert input_shapes(model, given)["past"] == (1, 2, 8, 4)


def _lstm(x_dims: list, lens_name: str, layout: int = 0, cast: bool = False):
    """An LSTM whose sequence_lens is a network input (through a Cast when ``cast``)."""
    rng = np.random.default_rng(0)
    weights = [
        helper.make_tensor("W", F, [1, 32, 16], rng.standard_normal(512).tolist()),
        helper.make_tensor("R", F, [1, 32, 8], rng.standard_normal(256).tolist()),
    ]
    lens = f"{lens_name}_i32" if cast else lens_name
    nodes = [
        helper.make_node("LSTM", ["X", "W", "R", "", lens], ["Y"], hidden_size=8, layout=layout)
    ]
    if cast:
        nodes.insert(0, helper.make_node("Cast", [lens_name], [lens], to=TensorProto.INT32))
    batch = x_dims[1 - layout if layout else 1]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [
            helper.make_tensor_value_info("X", F, x_dims),
            helper.make_tensor_value_info(lens_name, I64 if cast else TensorProto.INT32, [batch]),
        ],
        [helper.make_tensor_value_info("Y", F, None)],
        weights,
    )
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )


@pytest.mark.parametrize(
    ("x_dims", "given", "name", "layout", "cast", "steps"),
    [
        ([5, 2, 16], {}, "sequence_lens", 0, False, 5),  # static: ORT refused lengths > 5
        (["steps", "batch", 16], {"X": (3, 64, 16)}, "sequence_lens", 0, False, 3),
        (["batch", "steps", 16], {"X": (64, 4, 16)}, "n", 1, True, 4),  # any name, via Cast
    ],
)
def test_rnn_sequence_lens_stay_within_the_sequence(x_dims, given, name, layout, cast, steps):
    model = _lstm(x_dims, name, layout, cast)
    feeds = make_inputs(model, given, seed=3)
    lengths = feeds[name]
    assert lengths.min() >= 1 and lengths.max() <= steps
    if layout:  # ONNX Runtime runs no batch-first RNN
        return
    # ONNX Runtime takes them (it refuses a length beyond the sequence).
    import onnxruntime as ort

    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    session.run(None, feeds)


def test_repeated_axes_names_what_resize_feeds_tiles() -> None:
    from graphopt.inputs import repeated_axes

    feeds = {"x": np.zeros((1, 8), np.float32), "m": np.zeros((3, 4), np.int64)}
    assert repeated_axes(feeds, {"x": (2, 8), "m": (6, 2)}) == [
        "x axis 0: 1 row repeated 2x (rows identical)",
        "m axis 0: 3 -> 6, repeated",
    ]
    assert repeated_axes(feeds, {"x": (1, 4), "m": (3, 4)}) == []
