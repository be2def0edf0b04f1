"""torchvision classifiers: random seeded weights (``weights=None``), dynamic batch axis."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from graphopt.models.catalog import ModelSpec, register
from graphopt.models.export import export, seed_everything

# Exported with batch 2: torch.export specializes dims of size 1, which would pin the batch.
EXPORT_BATCH = 2

# name -> (input side, slow). Image sizes are static in the graph; only the batch is dynamic.
TORCHVISION_MODELS: dict[str, tuple[int, bool]] = {
    "resnet18": (224, False),
    "resnet50": (224, True),
    "mobilenet_v2": (224, False),
    "mobilenet_v3_small": (224, False),
    "mobilenet_v3_large": (224, True),
    "efficientnet_b0": (224, True),
    "densenet121": (224, True),
    "convnext_tiny": (224, True),
    "vit_b_16": (224, True),
    "swin_t": (224, True),
    "shufflenet_v2_x1_0": (224, True),
    "squeezenet1_0": (224, False),
    "regnet_y_400mf": (224, True),
    "googlenet": (224, True),
    "inception_v3": (299, True),
}

TORCHSCRIPT_VARIANTS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")

# Constructor arguments beyond weights=None (silence "init_weights will change" warnings and
# drop auxiliary heads, which only run in training mode anyway).
_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build_torchvision(name: str, side: int, path: Path, exporter: str = "auto") -> dict[str, Any]:
    import torch
    import torchvision

    seed_everything()
    constructor = getattr(torchvision.models, name)
    kwargs = dict(_KWARGS.get(name, {}))
    if name.startswith(SIZED_PREFIXES) and side != 224:
        kwargs["image_size"] = side
    model = constructor(weights=None, **kwargs).eval()
    example = torch.randn(EXPORT_BATCH, 3, side, side)
    info = export(
        model,
        (example,),
        path,
        input_names=["input"],
        output_names=["logits"],
        dynamic={"input": {0: "batch"}},
        exporter=exporter,
    )
    return {
        **info,
        "source": f"torchvision.models.{name}(weights=None), torch.manual_seed(0)",
        "test_shapes": {"input": [1, 3, side, side]},
    }


for _name, (_side, _slow) in TORCHVISION_MODELS.items():
    register(
        ModelSpec(
            name=_name,
            family="torchvision",
            description=f"torchvision {_name}, random seeded weights, 3x{_side}x{_side}",
            builder=partial(build_torchvision, _name, _side),
            requires=("torch", "torchvision"),
            slow=_slow,
        )
    )

# The same models through the legacy TorchScript exporter, whose graphs keep the leftovers
# (Identity, Flatten, shape arithmetic) many ONNX files in the wild still carry.
for _name in TORCHSCRIPT_VARIANTS:
    _side = TORCHVISION_MODELS[_name][0]
    register(
        ModelSpec(
            name=f"{_name}_ts",
            family="torchvision",
            description=f"torchvision {_name} via the TorchScript exporter (dynamo=False)",
            builder=partial(build_torchvision, _name, _side, exporter="torchscript"),
            requires=("torch", "torchvision"),
            slow=True,
        )
    )


# Every other torchvision classification architecture, built on demand as
# ``torchvision:<name>`` (the coverage bench walks them; they stay out of the default list).
EXTRA_PREFIX = "torchvision:"
_EXTRA_SIDES = {"inception_v3": 299}


def torchvision_classifiers() -> list[str]:
    """All torchvision classification model names (no weights are downloaded)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_size(name: str, side: int | None = None) -> tuple[int, float]:
    """(parameters, GFLOPs) from torchvision's weight metadata; the GFLOPs at ``side``×``side``
    when given (scaled from the reference resolution by pixel count), else at the reference."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    gflops = float(weights.meta.get("_ops", 0.0))
    crop = getattr(weights.transforms, "keywords", {}).get("crop_size")
    if side is not None and crop:
        gflops *= (side / crop) ** 2
    return int(weights.meta["num_params"]), gflops


# Architectures whose input size the model fixes (window grids, relative position tables):
# built at their own side whatever side is asked for.
FIXED_SIDE_PREFIXES = ("swin", "maxvit")
# Architectures that take their input size as a constructor argument: a ViT built with
# ``image_size=side`` has the same layers and groups, only a shorter position embedding.
SIZED_PREFIXES = ("vit_",)


def fixed_side(name: str, side: int | None = None) -> bool:
    """Whether ``name`` is built at its own side whatever is asked (a ViT: when ``side`` is
    not a multiple of its patch, ``vit_b_32`` at 112 say)."""
    if name.startswith(SIZED_PREFIXES):
        return side is not None and side % int(name.rsplit("_", 1)[1]) != 0
    return name.startswith(FIXED_SIDE_PREFIXES)


def ensure_torchvision(name: str, side: int | None = None) -> str:
    """Catalog name of torchvision ``name``: the registered entry, else ``torchvision:<name>``
    registered now (random seeded weights, same exporter and batch as the catalog ones).

    ``side``: build at that image side instead (``torchvision:<name>@<side>``), for
    architectures that take any size; a cheaper check of the same layers.
    """
    from graphopt.models.catalog import names

    if name.startswith(EXTRA_PREFIX):
        name = name[len(EXTRA_PREFIX) :]
    default = _EXTRA_SIDES.get(name, 224)
    if side is None or side == default or fixed_side(name, side):
        if name in TORCHVISION_MODELS:
            return name
        side, entry = default, EXTRA_PREFIX + name
    else:
        entry = f"{EXTRA_PREFIX}{name}@{side}"
    if entry not in names():
        register(
            ModelSpec(
                name=entry,
                family="torchvision",
                description=f"torchvision {name}, random seeded weights, 3x{side}x{side}",
                builder=partial(build_torchvision, name, side),
                requires=("torch", "torchvision"),
                slow=True,
            )
        )
    return entry
