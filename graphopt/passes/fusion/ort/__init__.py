"""``--target ort`` fusions into ONNX Runtime's com.microsoft contrib ops (no-ops otherwise)."""

# isort: off
# Order: the exported-SDPA NaN guard first (ort-sdpa-forms), so that the attention rules see
# a plain SDPA; norms and rotary before attention (the GQA/MHA rules expect RotaryEmbedding
# already fused), Gelu last (independent).
from graphopt.passes.fusion.ort import sdpa_forms  # noqa: F401  (imported for registration)
from graphopt.passes.fusion.ort import skip_layer_norm  # noqa: F401
from graphopt.passes.fusion.ort import rotary  # noqa: F401
from graphopt.passes.fusion.ort import group_query_attention  # noqa: F401
from graphopt.passes.fusion.ort import attention  # noqa: F401
from graphopt.passes.fusion.ort import packed_attention  # noqa: F401
from graphopt.passes.fusion.ort import attention_mask  # noqa: F401
from graphopt.passes.fusion.ort import unflatten_gemm  # noqa: F401
from graphopt.passes.fusion.ort import gelu  # noqa: F401

# isort: on
