"""The fusions inside the default pipeline on ONNX's light model zoo copies (shipped with onnx).

Light models carry uniform ConstantOfShape weights, so their verification is weak; the
per-pass tests prove exactness with random weights. Here we check the fusions find what
they should in real exported graphs and that the pipeline keeps the result verified.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from graphopt import editing
from graphopt.api import OptimizeOptions, optimize

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _run(name: str, fold_limit_bytes: int | None, out_dir: Path):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.fail(f"{path} is missing from the installed onnx package")
    # an explicit output: without one, optimize() writes beside the input (inside site-packages)
    options = OptimizeOptions(fold_limit_bytes=fold_limit_bytes)
    result = optimize(path, out_dir / f"{name}.onnx", options)
    hits = {s.name: s.hits for s in result.report.stats}
    return result, hits


@pytest.mark.parametrize(
    ("name", "fold_limit", "conv_bn"),
    [("resnet50", None, 53), ("shufflenet", 1 << 20, 49)],
)
def test_every_conv_bn_is_fused(
    name: str, fold_limit: int | None, conv_bn: int, tmp_path: Path
) -> None:
    result, hits = _run(name, fold_limit, tmp_path)
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    assert hits["fuse-conv-bn"] == conv_bn
    ops = [n.op_type for n in result.model.graph]
    assert "BatchNormalization" not in ops
    assert [v.name for v in result.model.graph.outputs] == [
        v.name for v in onnx.load(LIGHT / f"light_{name}.onnx").graph.output
    ]


def test_unfusable_bns_are_the_expected_ones(tmp_path: Path) -> None:
    # densenet121's pre-activation BNs follow Concat/pooling, never a Conv they could join.
    result, hits = _run("densenet121", 1 << 20, tmp_path)
    assert result.report.verification is not None and result.report.verification.ok
    assert hits["fuse-conv-bn"] == 59
    for node in result.model.graph:
        if node.op_type == "BatchNormalization":
            producer = node.inputs[0].producer()
            assert producer is not None
            assert not (editing.is_op(producer, "Conv") and editing.single_user(node.inputs[0]))
