"""Exporting torch modules to ONNX, the same way for every torch-built catalog model.

torch is imported lazily (inside functions) so the catalog and the demo work without it.

Exporter: torch 2.14's default, the torch.export-based exporter (``dynamo=True``, opset 18,
ONNX graph optimized by onnxscript, as users get it). When it refuses a model we fall back
to the legacy TorchScript exporter (``dynamo=False``, opset 17) and record which one ran in
the sidecar, so a failure of the default exporter is visible instead of silent.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphopt.models.catalog import versions

DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
SEED = 0

logger = logging.getLogger(__name__)


def seed_everything(seed: int = SEED) -> None:
    import torch

    torch.manual_seed(seed)


def export(
    module: Any,
    args: Sequence[Any],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: dict[str, dict[int, str]],
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export ``module(*args)`` to ``path``; returns sidecar fields (exporter, versions, ...).

    ``dynamic`` maps input names to ``{axis: dim_name}``; ``exporter`` is ``"dynamo"``,
    ``"torchscript"`` or ``"auto"`` (dynamo, falling back to torchscript).
    """
    import torch

    module = module.eval()
    attempts = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: list[str] = []
    for kind in attempts:
        try:
            with torch.no_grad(), _quiet():
                if kind == "dynamo":
                    _export_dynamo(module, args, path, input_names, output_names, dynamic)
                else:
                    _export_torchscript(module, args, path, input_names, output_names, dynamic)
        except Exception as exc:  # exporters raise many types; fall back and record it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{kind}: {type(exc).__name__}: {first[:300]}")
            logger.warning("%s exporter failed: %s", kind, failures[-1])
            continue
        info: dict[str, Any] = {
            "exporter": f"torch.onnx.export(dynamo={kind == 'dynamo'})",
            "versions": versions("torch", "torchvision", "transformers", "onnxscript"),
        }
        if failures:
            info["exporter_failures"] = failures
        return info
    raise RuntimeError("all exporters failed: " + "; ".join(failures))


def _export_dynamo(module, args, path, input_names, output_names, dynamic) -> None:
    import inspect

    import torch

    # torch.export names dynamic dims per forward() parameter, in order.
    params = list(inspect.signature(module.forward).parameters)[: len(args)]
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for param, input_name in zip(params, input_names, strict=True):
        axes = dynamic.get(input_name, {})
        shapes[param] = {
            axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()
        }
    torch.onnx.export(
        module,
        tuple(args),
        str(path),
        dynamo=True,
        opset_version=DYNAMO_OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=shapes,
        external_data=False,
        verbose=False,
    )


def _export_torchscript(module, args, path, input_names, output_names, dynamic) -> None:
    import torch

    torch.onnx.export(
        module,
        tuple(args),
        str(path),
        dynamo=False,
        opset_version=TORCHSCRIPT_OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes={name: dict(axes) for name, axes in dynamic.items()},
        do_constant_folding=True,
    )


@contextlib.contextmanager
def _quiet():
    """Keep the exporters' progress lines and deprecation warnings out of test output."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(_io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield
