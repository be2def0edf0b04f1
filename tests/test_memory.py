"""Peak memory of inspect and optimize on an external-data model (reduced bench/memory.py).

A pass or a save that materializes every weight shows up as RSS growth close to the model's
size; the bound below (half the weights) catches that while leaving room for allocator noise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

import graphopt.io
from tests.helpers import assert_same_outputs

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory.py"


def _bench():
    name = "graphopt_bench_memory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    # 8 layers of 2048×2048 fp32: 128 MiB of weights; the last two repeat the sixth, so
    # deduplication has whole weights to compare.
    return _bench().generate(tmp_path_factory.mktemp("mem"), layers=8, dim=2048, duplicates=2)


def test_generated_model_is_lazy_and_valid(big_model: Path) -> None:
    loaded = graphopt.io.load(big_model)
    assert loaded.uses_external_data
    assert graphopt.io.total_tensor_bytes(loaded.model) == 8 * 2048 * 2048 * 4


def test_inspect_and_optimize_do_not_materialize_weights(big_model: Path) -> None:
    bench = _bench()
    size = bench.data_bytes(big_model)
    before = _digest(big_model.with_name(big_model.name + ".data"))
    results = {r.label: r for r in bench.run_all(big_model)}
    base = results["python + imports"].peak_rss_bytes
    for label in ("inspect", "optimize --no-verify"):
        r = results[label]
        assert r.rc == 0, f"{label} failed: {r.stderr}"
        growth = r.peak_rss_bytes - base
        assert growth < 0.5 * size, (
            f"{label}: peak RSS {r.peak_rss_bytes >> 20} MiB is {growth >> 20} MiB over the "
            f"import baseline for {size >> 20} MiB of weights"
        )
    out = big_model.with_name("model.opt.onnx")
    out_data = out.parent / "model.opt.onnx.data"
    # Deduplication may drop the repeated weights, nothing may add any.
    assert 0 < out_data.stat().st_size <= size
    assert _digest(big_model.with_name(big_model.name + ".data")) == before
    # The written model computes what the original does.
    original, optimized = graphopt.io.load(big_model).model, graphopt.io.load(out).model
    assert_same_outputs(original, optimized)


def test_measurement_catches_materialized_weights(big_model: Path) -> None:
    """Control: a process that reads every weight into memory does show up as growth."""
    bench = _bench()
    size = bench.data_bytes(big_model)
    code = "import sys, graphopt.api, graphopt.io as io; io.to_proto(io.load(sys.argv[1]).model)"
    base = bench.baseline().peak_rss_bytes
    greedy = bench.measure("materialize", [sys.executable, "-c", code, str(big_model)])
    assert greedy.rc == 0, greedy.stderr
    assert greedy.peak_rss_bytes - base > 0.9 * size
