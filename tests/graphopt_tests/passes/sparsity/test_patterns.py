"""Pattern parsing and the masks each pattern gives (canonical ``[N, K]`` weights)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import UserInputError
from graphopt.passes.sparsity.masks import nm_mask, pattern_mask, tile_mask, zeros_between
from graphopt.passes.sparsity.settings import Pattern, resolve_choices


@pytest.mark.parametrize(
    ("text", "ratio", "k_multiple", "n_multiple"),
    [
        ("2:4", 0.5, 4, 1),
        ("1:4", 0.75, 4, 1),
        ("4:8", 0.5, 8, 1),
        ("block:1x4=0.8", 0.8, 4, 1),
        ("block:16x1=0.5", 0.5, 1, 16),
        ("block:4x4=0.6", 0.6, 4, 4),
        ("unstructured=0.3", 0.3, 1, 1),
        (" Block:1X4=0.8 ", 0.8, 4, 1),
    ],
)
def test_patterns_parse(text, ratio, k_multiple, n_multiple):
    pattern = Pattern.parse(text)
    assert pattern.ratio == pytest.approx(ratio)
    assert (pattern.k_multiple, pattern.n_multiple) == (k_multiple, n_multiple)
    assert Pattern.parse(str(pattern)) == pattern  # the report's spelling parses back


@pytest.mark.parametrize(
    "text", ["", "2", "4:2", "0:4", "2:4:8", "block:1x4", "block:0x4=0.5", "block:1x4=1.5",
             "unstructured=0", "unstructured=abc", "dense=0.5"]
)  # fmt: skip
def test_malformed_patterns_are_one_line_errors(text):
    with pytest.raises(UserInputError) as info:
        Pattern.parse(text)
    assert "\n" not in str(info.value) and "--sparsity" in str(info.value)


def test_nm_mask_keeps_exactly_n_of_every_m_consecutive():
    scores = np.random.default_rng(0).random((6, 16))
    mask = nm_mask(scores, 2, 4)
    groups = mask.reshape(6, 4, 4)
    assert (groups.sum(axis=2) == 2).all()
    # The kept ones are the two largest of each group.
    kept = np.where(groups, scores.reshape(6, 4, 4), np.inf).min(axis=2)
    dropped = np.where(~groups, scores.reshape(6, 4, 4), -np.inf).max(axis=2)
    assert (kept > dropped).all()


def test_tile_mask_zeroes_whole_tiles_with_per_row_quotas():
    scores = np.random.default_rng(1).random((8, 32))
    pattern = Pattern.parse("block:2x4=0.75")
    mask = tile_mask(scores, pattern)
    tiles = mask.reshape(4, 2, 8, 4)
    # Each tile is all kept or all zero, and each row of tiles loses 6 of its 8.
    assert (tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3))).all()
    assert (tiles.any(axis=(1, 3)).sum(axis=1) == 2).all()


def test_zeros_between_adds_up_to_the_whole_row():
    ratio, pieces = 0.8, [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert sum(zeros_between(ratio, a, b) for a, b in pieces) == round(ratio * 100)


def test_unstructured_mask_share():
    scores = np.random.default_rng(2).random((5, 40))
    mask = pattern_mask(scores, Pattern.parse("unstructured=0.3"))
    assert (mask.sum(axis=1) == 28).all()


def test_defaults_follow_the_calibration_source():
    assert resolve_choices(None, None, None).criterion == "magnitude"
    assert resolve_choices(None, None, "random").criterion == "magnitude"
    chosen = resolve_choices(None, None, "calib.npz")
    assert (chosen.criterion, chosen.allocation) == ("reconstruction", "uniform")
    assert chosen.defaulted == ("criterion", "allocation")
    assert "defaults with a calibration file" in chosen.note("calib.npz")
    with pytest.raises(UserInputError):
        resolve_choices("obs", None, None)
