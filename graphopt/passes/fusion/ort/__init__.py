"""``--target ort`` fusions into ONNX Runtime's com.microsoft contrib ops (no-ops otherwise)."""

# isort: off
# Order: norms; GQA before rotary (its rule takes the rotation as it is and leaves it outside
# the GQA node, and after rotary's fusion it no longer matches TorchScript exports: measured on
# llama_tiny_ts, 0 GQA after rotary, 2 before); rotary before MHA/Attention (their rules expect
# RotaryEmbedding already fused); Gelu last (independent).
from graphopt.passes.fusion.ort import skip_layer_norm  # noqa: F401  (imported for registration)
from graphopt.passes.fusion.ort import group_query_attention  # noqa: F401
from graphopt.passes.fusion.ort import rotary  # noqa: F401
from graphopt.passes.fusion.ort import attention  # noqa: F401
from graphopt.passes.fusion.ort import packed_attention  # noqa: F401
from graphopt.passes.fusion.ort import attention_mask  # noqa: F401
from graphopt.passes.fusion.ort import unflatten_gemm  # noqa: F401
from graphopt.passes.fusion.ort import gelu  # noqa: F401

# isort: on
