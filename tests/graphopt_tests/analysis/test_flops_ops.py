"""FLOPs of the ops with multiply-adds that were counted 0 ("not counted") before: Det,
DeformConv, DFT / STFT, LRN, MeanVarianceNormalization, SwiGLU, CumProd, ORT's FusedGemm;
each against a direct count or the plain ops it stands for."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.flops import model_flops
from graphopt.io import load
from graphopt_tests.helpers import tensor_info

F = TensorProto.FLOAT


def _flops(nodes, inputs, out_rank, inits=None, opset=22, contrib=False):
    tensors = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    outputs = [tensor_info("y", F, [None] * out_rank)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, tensors)
    opsets = [helper.make_opsetid("", opset)] + contrib * [helper.make_opsetid("com.microsoft", 1)]
    report = model_flops(load(helper.make_model(graph, opset_imports=opsets, ir_version=8)).model)
    assert not report.not_counted and not report.unknown_shape, report
    return report.total, report.macs


def _lu_determinant_ops(n: int) -> int:
    """FLOPs of a determinant by Gaussian elimination, counted while running it."""
    a = np.random.default_rng(0).standard_normal((n, n)) + n * np.eye(n)
    flops = 0
    for k in range(n):
        for i in range(k + 1, n):
            factor = a[i, k] / a[k, k]
            flops += 1
            for j in range(k + 1, n):
                a[i, j] -= factor * a[k, j]
                flops += 2
    return flops + n - 1  # the product of the diagonal


def test_det_counts_an_lu_factorization() -> None:
    x = [tensor_info("x", F, [3, 5, 5])]
    assert _flops([helper.make_node("Det", ["x"], ["y"])], x, 1) == (3 * _lu_determinant_ops(5), 0)


def test_deform_conv_counts_its_conv_and_the_mask() -> None:
    weights = {"w": np.ones((8, 4, 3, 3), np.float32), "b": np.ones(8, np.float32)}
    x = tensor_info("x", F, [1, 4, 6, 6])
    offsets = [tensor_info("off", F, [1, 18, 4, 4]), tensor_info("mask", F, [1, 9, 4, 4])]
    deform = helper.make_node(
        "DeformConv", ["x", "w", "off", "b", "mask"], ["y"], kernel_shape=[3, 3]
    )
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"])
    flops, macs = _flops([deform], [x, *offsets], 4, weights)
    plain = _flops([conv], [x], 4, weights)
    # 1 · 4 input channels · 4·4 positions · 9 taps sampled, each scaled by its mask value.
    assert (flops, macs) == (plain[0] + 4 * 16 * 9, plain[1])


def _fft_flops(n: int) -> int:
    """A radix-2 FFT of n points: (n/2)·log2(n) butterflies of a complex multiply (6 FLOPs)
    and two complex adds (4 FLOPs)."""
    return n // 2 * int(math.log2(n)) * 10


def test_dft_counts_as_an_fft() -> None:
    dft = helper.make_node("DFT", ["x"], ["y"])
    assert _flops([dft], [tensor_info("x", F, [1, 8, 2])], 3, opset=17) == (_fft_flops(8), 0)
    # Opset 20's default axis is -2: three transforms of 8.
    x = [tensor_info("x", F, [3, 1, 8, 2])]
    assert _flops([dft], x, 4, opset=20) == (3 * _fft_flops(8), 0)
    # Onesided (real input): 5 of the 8 outputs, 5·log2(8) each.
    onesided = helper.make_node("DFT", ["x"], ["y"], onesided=1)
    assert _flops([onesided], [tensor_info("x", F, [1, 8, 1])], 3, opset=17) == (5 * 5 * 3, 0)


def test_stft_counts_an_fft_per_frame_and_the_window() -> None:
    inits = {"step": np.array(16, np.int64), "win": np.ones(16, np.float32)}
    stft = helper.make_node("STFT", ["x", "step", "win"], ["y"], onesided=1)
    # 4 frames of 16 samples, 9 onesided bins each: 5·log2(16) per bin, 1 per windowed sample.
    assert _flops([stft], [tensor_info("x", F, [1, 64, 1])], 4, inits, opset=17) == (
        4 * 9 * 5 * 4 + 4 * 16,
        0,
    )


def test_lrn_mvn_cumprod_swiglu_per_element() -> None:
    x = [tensor_info("x", F, [1, 4, 5, 5])]
    lrn = helper.make_node("LRN", ["x"], ["y"], size=3)
    assert _flops([lrn], x, 4) == ((2 * 3 + 4) * 100, 0)
    mvn = helper.make_node("MeanVarianceNormalization", ["x"], ["y"])
    assert _flops([mvn], x, 4) == (5 * 100, 0)
    axis = {"axis": np.array(0, np.int64)}
    cumprod = helper.make_node("CumProd", ["x", "axis"], ["y"])
    assert _flops([cumprod], x, 4, axis, opset=26) == (100, 0)
    ab = [tensor_info("a", F, [4, 5]), tensor_info("b", F, [4, 5])]
    swiglu = helper.make_node("SwiGLU", ["a", "b"], ["y"])
    unfused = [
        helper.make_node("Sigmoid", ["a"], ["s"]),
        helper.make_node("Mul", ["a", "s"], ["swish"]),
        helper.make_node("Mul", ["swish", "b"], ["y"]),
    ]
    assert _flops([swiglu], ab, 2, opset=28) == _flops(unfused, ab, 2, opset=28)


def test_fused_gemm_counts_as_gemm_and_its_activation() -> None:
    inits = {"w": np.ones((4, 6), np.float32), "c": np.ones(6, np.float32)}
    x = [tensor_info("x", F, [3, 4])]
    fused = helper.make_node(
        "FusedGemm", ["x", "w", "c"], ["y"], domain="com.microsoft", activation="Relu"
    )
    plain = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"]),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    assert _flops([fused], x, 2, inits, contrib=True) == _flops(plain, x, 2, inits)


def test_col2im_is_data_movement() -> None:
    inits = {"size": np.array([4, 4], np.int64), "block": np.array([2, 2], np.int64)}
    col2im = helper.make_node("Col2Im", ["x", "size", "block"], ["y"])
    assert _flops([col2im], [tensor_info("x", F, [1, 8, 9])], 4, inits) == (0, 0)
