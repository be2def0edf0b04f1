"""The crossover's bookkeeping: shape classes, the per-user cache, the decisions file, and the
``--sparse-kernels`` switch in the pipeline (none of it needs the kernel library)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.passes.sparsity import crossover, lowering
from graphopt.passes.sparsity.crossover import CrossoverCache, Timing


def test_bucket_rounds_up_to_three_significant_bits() -> None:
    assert [crossover.bucket(v) for v in (1, 7, 8, 9, 384, 1000, 1536, 3072)] == [
        1,
        7,
        8,
        10,
        384,
        1024,
        1536,
        3072,
    ]


def test_shape_class_separates_what_timing_depends_on() -> None:
    key = crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 1, "abc")
    assert key == crossover.shape_class("f32", 384, 1536, 120, "bsr1x4", 0.81, 1, "abc")
    for other in (
        crossover.shape_class("s8", 384, 1536, 128, "bsr1x4", 0.8, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr4x1", 0.8, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.5, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 2, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 1, "new-build"),
        crossover.shape_class("f32", 384, 1536, 1024, "bsr1x4", 0.8, 1, "abc"),
    ):
        assert other != key
    assert key.startswith(crossover.cpu_signature())


def test_cache_round_trip_is_atomic_and_tolerates_garbage(tmp_path: Path) -> None:
    path = tmp_path / "kernels" / "crossover-x.json"
    cache = CrossoverCache(path)
    assert cache.get("k") is None
    cache.put("k", Timing(1.5, 0.5))
    assert CrossoverCache(path).get("k") == Timing(1.5, 0.5)
    assert Timing(1.5, 0.5).speedup == 3.0
    # Only the cache file: the temporary file was renamed over it.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    path.write_text("{not json")
    assert CrossoverCache(path).get("k") is None  # a broken cache only costs a measurement


def test_cache_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = crossover.cache_path()
    assert path.parent == tmp_path / "graphopt" / "kernels"
    assert path.name == f"crossover-{crossover.cpu_signature()}.json"


def test_decisions_file_errors_are_one_line(tmp_path: Path) -> None:
    assert lowering.load_decisions("") == {}
    bad = tmp_path / "d.json"
    bad.write_text("[")
    with pytest.raises(UserInputError, match="cannot read sparse-kernel decisions"):
        lowering.load_decisions(str(bad))
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"layers": [{"layer": "fc1", "lowered": True}]}))
    assert lowering.load_decisions(str(good)) == {"fc1": {"layer": "fc1", "lowered": True}}


def test_switch_runs_last_and_only_for_target_ort() -> None:
    steps, _ = OptimizeOptions(target="ort", sparse_kernels=True).pipeline()
    assert [spec.name for spec in steps[-1].passes] == ["sparse-kernels"]
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_min_speedup=2)
    assert steps[-1].passes[0].options == {}
    assert options.pipeline()[0][-1].passes[0].options == {"min_speedup": 2}
    with pytest.raises(UserInputError, match="--sparse-kernels needs --target ort"):
        OptimizeOptions(sparse_kernels=True).pipeline()
    with pytest.raises(UserInputError, match="is a switch"):
        OptimizeOptions(target="ort", sparse_kernels="maybe").pipeline()
    with pytest.raises(UserInputError, match="only applies with --sparse-kernels"):
        OptimizeOptions(target="ort", sparse_kernels_min_speedup=2).pipeline()
