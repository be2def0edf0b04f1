"""What a quantization run is asked to do: the mode and its settings, checked once."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphopt.errors import UserInputError

# --quantize MODE -> "module:function" that quantizes a model in that mode (imported on use).
MODES = {
    "int8": "graphopt.passes.quantization.static:quantize_static",
    "int8-dynamic": "graphopt.passes.quantization.dynamic:quantize_dynamic",
    "int4-weight": "graphopt.passes.quantization.int4:quantize_int4",
    "fp16": "graphopt.passes.quantization.float_types:quantize_float",
    "bf16": "graphopt.passes.quantization.float_types:quantize_float",
    "fp8": "graphopt.passes.quantization.float_types:quantize_float",
}
CALIB_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
QUANT_FORMATS = ("qdq", "qoperator")
ACTIVATION_TYPES = ("u8", "s8")
INT4_METHODS = ("rtn", "gptq", "awq")
# --int8-weights: how int8 (static and dynamic) rounds weights (int8_rounding.py).
INT8_WEIGHT_METHODS = ("rtn", "gptq")
INT8_MODES = ("int8", "int8-dynamic")
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSettings:
    """The resolved settings of one run (defaults filled, names checked).

    ``defaulted`` names the settings the user left unset (the report says which were chosen
    for them); ``target`` is the run's ``--target``.
    """

    mode: str
    target: str = "portable"
    calib: str = ""
    calib_method: str = "auto"
    quant_format: str = "qdq"
    activation_type: str = "s8"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    max_error: float | None = None
    min_cosine: float | None = None
    min_agreement: float | None = None
    smoothquant: float = 0.0
    equalize: bool = False
    bias_correction: bool = False
    block_size: int = 32
    int4_method: str = "rtn"
    int8_weights: str = "rtn"
    int4_asymmetric: bool = False
    quantize_embeddings: bool = False
    autotune: bool = False
    holdout: float = 0.25
    compensation: int = 0  # --compensation eora:R: the rank (0: none)
    seed: int = 0
    defaulted: tuple[str, ...] = field(default=())
    # Per node of the graph being quantized (keyed by its first output's name): the op type
    # and name of each node of the user's model it stands for (graphopt.analysis.origins).
    # ``--exclude`` matches those: the exact passes before quantization fuse and rename nodes.
    origins: Mapping[str, tuple[tuple[str, str], ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Nodes of the graph being quantized (by name) a mixed-precision search keeps in float
    # in a mode with no search of its own (:mod:`.mode_search`).
    keep_float: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def mixed_precision(self) -> bool:
        return any(v is not None for v in (self.max_error, self.min_cosine, self.min_agreement))

    def excluded(self, node: ir.Node) -> bool:
        """Whether ``--exclude`` keeps this node in its original precision: a pattern matches
        the op type exactly or the node name as a shell glob (``*attention*``), of the nodes
        of the user's model it stands for (``origins``), else of the node itself."""
        if node.name and node.name in self.keep_float:
            return True
        if not self.exclude:
            return False
        key = node.outputs[0].name if node.outputs else None
        found = self.origins.get(key or "", ()) or ((node.op_type, node.name or ""),)
        return any(
            pattern == op_type or fnmatch.fnmatchcase(name, pattern)
            for pattern in self.exclude
            for op_type, name in found
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("defaulted", "origins", "keep_float")
        }
        data["exclude"] = list(self.exclude)
        data["defaulted"] = list(self.defaulted)
        return data


def parse_mode(text: str) -> str:
    mode = str(text).strip().lower()
    if mode not in MODES:
        raise UserInputError(f"--quantize {text!r}: expected one of {', '.join(MODES)}")
    return mode


def parse_patterns(text: str) -> tuple[str, ...]:
    """``--exclude Softmax,*head*`` as patterns (empty items dropped)."""
    return tuple(p.strip() for p in str(text).split(",") if p.strip())
