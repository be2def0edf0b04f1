"""The lossy passes compose: a recipe erases a block, decomposes MLPs, factorizes what is left
with an EoRA path, and prunes, in the fixed stage order, each reporting its own section."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from graphopt.analysis.stats import count_nodes
from graphopt.cli import main
from graphopt.models import build

RECIPE = """\
version: 1
lossy:
  - name: erase-blocks
    options: {count: 1, calib: random}
  - name: prune
    options: {flops: 0.1, calib: random}
  - name: decompose
    options: {ratio: 0.25, modules: mlp, calib: random}
  - name: factorize
    options: {rule: "ratio=0.5", calib: random, compensation: "eora:4", speed_check: "off"}
"""


def test_a_recipe_runs_every_new_lossy_pass_in_stage_order(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(build("bert_tiny")), "-o", str(out), "--recipe", str(recipe)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    # The pass table lists the lossy passes that ran, in the order they ran.
    ran = [line.split()[0] for line in text.splitlines() if "│ lossy" in line]
    assert ran == ["erase-blocks", "prune", "decompose", "factorize"]
    sections = ["erase-blocks 1", "decompose ratio=0.25", "factorize ratio=0.5", "EoRA rank 4"]
    order = [text.index(head) for head in sections]
    assert order == sorted(order)
    model = ir.load(out)
    assert count_nodes(model) < count_nodes(ir.load(build("bert_tiny")))
    assert any("lowrank" in (n.name or "") for n in model.graph)  # factorized pairs are there
