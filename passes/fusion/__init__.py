"""Exact layer fusions, one module per family."""

# Import order is pipeline order (passes of one stage run in registration order): BN first so
# that a Mul/Add behind the BN can then join the same Conv; MatMul+Add before Transpose→Gemm so
# that a Transpose feeding a new Gemm is folded too.
# isort: off
from graphopt.passes.fusion import conv_bn  # noqa: F401  (imported for registration)
from graphopt.passes.fusion import conv_affine  # noqa: F401
from graphopt.passes.fusion import pad_conv  # noqa: F401
from graphopt.passes.fusion import matmul_add  # noqa: F401
from graphopt.passes.fusion import transpose_gemm  # noqa: F401

# isort: on
