"""Exact layer fusions, one module per family."""

# Import order is pipeline order (passes of one stage run in registration order): BN first so
# that a Mul/Add behind the BN can then join the same Conv; MatMul+Add before Transpose→Gemm so
# that a Transpose feeding a new Gemm is folded too.
# isort: off
# ORT contrib-op fusions first: with --target ort they claim the transformer patterns
# before the portable fusions rewrite them (and with the default target they do nothing).
from graphopt.passes.fusion import ort  # noqa: F401
from graphopt.passes.fusion import conv_bn  # noqa: F401  (imported for registration)
from graphopt.passes.fusion import conv_affine  # noqa: F401
from graphopt.passes.fusion import pad_conv  # noqa: F401
from graphopt.passes.fusion import matmul_add  # noqa: F401
from graphopt.passes.fusion import transpose_gemm  # noqa: F401

# Pattern fusions into standard ONNX ops (onnxscript rewrite rules), after the basic fusions
# and before fold-scale-into-weights (which would move GELU's 0.5 or a norm's gamma into the
# next MatMul); LayerNorm before RMSNorm (a LayerNorm's variance part is an RMSNorm shape).
# ReduceX(keepdims=0)+Unsqueeze is merged first so that norms exported that way match too.
from graphopt.passes.fusion import reduce_unsqueeze  # noqa: F401
from graphopt.passes.fusion import layer_norm  # noqa: F401
from graphopt.passes.fusion import residual_sum  # noqa: F401  (after LayerNorm exists)
from graphopt.passes.fusion import rms_norm  # noqa: F401
from graphopt.passes.fusion import gelu  # noqa: F401
from graphopt.passes.fusion import activations  # noqa: F401
from graphopt.passes.fusion import attention  # noqa: F401

# More exact fusions: BN into ConvTranspose/MatMul first (matmul-bn makes Gemms), scales into
# weights before gemm-affine so it sees the Gemms' remaining Mul/Add; shape-op chains last.
from graphopt.passes.fusion import conv_transpose_bn  # noqa: F401
from graphopt.passes.fusion import matmul_bn  # noqa: F401
from graphopt.passes.fusion import scale_into_weights  # noqa: F401
from graphopt.passes.fusion import gemm_affine  # noqa: F401
from graphopt.passes.fusion import pad_pool  # noqa: F401
from graphopt.passes.fusion import chains  # noqa: F401
from graphopt.passes.fusion import activation_chains  # noqa: F401

# isort: on
