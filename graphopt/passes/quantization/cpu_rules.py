"""Which int8 activation type and format ONNX Runtime's CPU kernels run fastest, per CPU.

ORT's integer GEMM/conv (MLAS) picks its kernel from the CPU's features. The rule table
below gives, per feature set, the activation/weight types of ``--target ort`` int8 when the
user names none:

- **x86 with AVX-512 VNNI or AVX-VNNI**: u8 activations, s8 weights. ``vpdpbusd`` multiplies
  u8 by s8 and accumulates in int32 without saturation; MLAS's u8s8 kernels use it.
  s8 activations take a slower path (measured here, Zen 4 with AVX-512 VNNI, ORT 1.32,
  ResNet-50: u8 3.2× vs s8 1.5× over fp32; BENCHMARKS.md "Quantization").
- **x86 with AVX2 only**: u8 activations, s8 weights, but ``vpmaddubsw`` adds pairs of u8·s8
  products into int16 with saturation; ORT's own docs recommend ``reduce_range`` (7-bit
  weights) there. graphopt keeps 8-bit weights and u8 activations: its symmetric s8 weights
  stay in [-127, 127] and saturation needs two near-extreme products in a pair (documented
  from MLAS's sources, not measured here: this machine has VNNI).
- **ARM64 (NEON dot product)**: s8 activations, s8 weights (``sdot``); MLAS's s8s8 kernels
  are its fast path there (from MLAS's sources; not measured here).
- **Anything else**: u8 activations, s8 weights (ORT's QDQ defaults on CPU).

``--autotune`` measures the candidates on the user's machine instead.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

# The output's record of a choice made by the table (metadata_props): the CPU family and the
# activation type it gave.
CPU_RULE_KEY = "graphopt.cpu_rule"

RULES = {
    "x86-vnni": "u8",
    "x86-avx2": "u8",
    "arm64": "s8",
    "other": "u8",
}


def cpu_family() -> str:
    """This machine's row of the rule table."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return "other"
    flags = _cpu_flags()
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "x86-vnni"
    if "avx2" in flags:
        return "x86-avx2"
    return "other"


def activation_type_for_this_cpu() -> str:
    return RULES[cpu_family()]


def record(family: str, activation_type: str) -> str:
    """The metadata value recording the table's choice."""
    return json.dumps({"activation_type": activation_type, "cpu_family": family}, sort_keys=True)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()
