"""Importance of every unit of a group under one criterion (higher = keep).

- ``l1`` / ``l2``: the group's parameter slices of the unit — every member, e.g. a Conv's
  output filter, its bias, the BN parameters and the next layer's input columns — by their
  summed absolute values / joint Euclidean norm (Torch-Pruning's group norm).
- ``bn_scale``: |γ| of the BatchNormalization the group goes through (network slimming).
- ``activation``: Σ ‖X_j‖₂ · ‖W_{:,j}‖₂ over the unit's input channels j of each consumer
  layer (Wanda, per channel), X from calibration data.
- ``fluctuation``: Σ Var(X_j) · ‖W_{:,j}‖₂² (FLAP's fluctuation metric).
- ``reconstruction``: Σ ‖W_{:,j}‖₂² / [(Σ + λI)⁻¹]_jj, the output error left when channel j
  goes and the others are refitted by least squares (Optimal Brain Surgeon's saliency for a
  whole input channel, Σ the channel covariance). It rates a channel by what the *others*
  cannot reconstruct, so it pairs with ``--compensation lsq``; channels that are highly
  correlated with kept ones cost little to remove.

A criterion that cannot apply to a group (no BN, no consumer layer) falls back to ``l2``
for that group and says so. Scores are divided by their mean within the group so that
global allocation compares groups of different scale on the same footing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.analysis.dependency import DimKey
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport
from graphopt.editing import constant_array
from graphopt.passes.calibration.activations import ChannelStats
from graphopt.passes.pruning.consumers import Consumer


@dataclass
class GroupScores:
    group: int
    scores: np.ndarray  # per unit, mean-normalized
    criterion: str  # the criterion actually used (after any fallback)


def score_group(
    report: ZigReport,
    group: ZeroInvariantGroup,
    criterion: str,
    consumers: list[Consumer],
    stats: dict[DimKey, ChannelStats] | None,
) -> GroupScores:
    used = criterion
    raw: np.ndarray | None = None
    if criterion == "bn_scale":
        raw = _bn_scale(report, group)
    elif criterion in ("activation", "fluctuation", "reconstruction") and stats is not None:
        raw = _activation(report, group, criterion, consumers, stats)
    elif criterion in ("l1", "l2"):
        raw = _magnitude(report, group, criterion)
    if raw is None:
        used = "l2"
        raw = _magnitude(report, group, "l2")
    mean = float(raw.mean()) if raw.size else 0.0
    scores = raw / mean if mean > 0 else np.zeros_like(raw)
    return GroupScores(group.id, scores, used)


def _per_unit(group: ZeroInvariantGroup, key: DimKey, per_element: np.ndarray) -> np.ndarray:
    return np.bincount(group.dims[key], weights=per_element, minlength=group.size)


def _reduce_except(array: np.ndarray, axis: int, power: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(array.astype(np.float64)) ** power, axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1)


def _weight(report: ZigReport, key: DimKey) -> np.ndarray:
    array = constant_array(report.graph.dims[key].value)
    if array is None:
        raise ValueError(f"cannot read parameter {key[0]}")
    return array


def _magnitude(report: ZigReport, group: ZeroInvariantGroup, criterion: str) -> np.ndarray:
    power = 1 if criterion == "l1" else 2
    total = np.zeros(group.size)
    for key in group.dims:
        if report.graph.dims[key].is_param:
            total += _per_unit(group, key, _reduce_except(_weight(report, key), key[1], power))
    return total if power == 1 else np.sqrt(total)


def _bn_scale(report: ZigReport, group: ZeroInvariantGroup) -> np.ndarray | None:
    total, found = np.zeros(group.size), False
    for key in group.dims:
        dim = report.graph.dims[key]
        if not dim.is_param:
            continue
        uses = [dim.use_node] if dim.use_node is not None else [u.node for u in dim.value.uses()]
        for node in uses:
            if node.op_type == "BatchNormalization" and node.inputs[1] is dim.value:
                total += _per_unit(group, key, np.abs(_weight(report, key).astype(np.float64)))
                found = True
    return total if found else None


def _activation(
    report: ZigReport,
    group: ZeroInvariantGroup,
    criterion: str,
    consumers: list[Consumer],
    stats: dict[DimKey, ChannelStats],
) -> np.ndarray | None:
    total, found = np.zeros(group.size), False
    for consumer in consumers:
        if consumer.group != group.id or consumer.data_key not in stats:
            continue
        weight = _weight(report, consumer.weight_key)
        column_sq = _reduce_except(weight, consumer.weight_key[1], 2)
        channel = stats[consumer.data_key]
        if criterion == "activation":
            per_element = channel.norm * np.sqrt(column_sq)
        elif criterion == "fluctuation":
            per_element = channel.variance * column_sq
        elif channel.gram is not None:
            per_element = column_sq / _inverse_diagonal(channel.covariance)
        else:  # too many channels for a covariance: the activation norm instead
            per_element = channel.norm * np.sqrt(column_sq)
        total += _per_unit(group, consumer.weight_key, per_element)
        found = True
    return total if found else None


def _inverse_diagonal(covariance: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """diag((Σ + λI)⁻¹), λ relative to the mean variance (Σ may be singular)."""
    scale = max(float(np.mean(np.diag(covariance))), 1e-12)
    system = covariance + ridge * scale * np.eye(len(covariance))
    return np.diag(np.linalg.inv(system))
