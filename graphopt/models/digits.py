"""A small CNN trained on scikit-learn's bundled digits: a real-weight model for pruning tests.

Everything is deterministic and local: the 1797 8×8 digits ship inside scikit-learn, are
upsampled ×2 (nearest) to 16×16 and split once by a seeded permutation into train /
calibration / test; training runs on one CPU thread with fixed seeds and deterministic
algorithms, so two builds give the same weights (and the same ONNX bytes). Training takes a
few seconds, so :func:`build_torch_model` simply retrains instead of caching a state dict.

``data(split)`` needs only numpy and scikit-learn; torch is imported only to train/export.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.models.catalog import ModelSpec, register, versions

SIDE = 16  # 8×8 digits upsampled ×2: room for two 2×2 poolings
SPLITS = ("train", "calib", "test")
# Split sizes (the rest, 1181 samples, is train). Seeded permutation, never reshuffled.
CALIB_SIZE = 256
TEST_SIZE = 360
SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 6
BATCH = 32
LEARNING_RATE = 2e-3
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORT_BATCH = 2  # torch.export specializes dims of size 1, which would pin the batch


@functools.cache
def _all_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to [0, 1] and upsample by repeating pixels.
    images = digits.images.astype(np.float32) / 16.0
    images = images.repeat(SIDE // 8, axis=1).repeat(SIDE // 8, axis=2)
    return images[:, None, :, :], digits.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Sample indices of ``split`` ("train", "calib" or "test") into the digits data set."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    count = len(_all_data()[1])
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    bounds = {
        "test": (0, TEST_SIZE),
        "calib": (TEST_SIZE, TEST_SIZE + CALIB_SIZE),
        "train": (TEST_SIZE + CALIB_SIZE, count),
    }
    start, stop = bounds[split]
    return np.sort(order[start:stop])


def data(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of ``split``: x float32 [N, 1, 16, 16] in [0, 1], y int64 labels [N]."""
    images, labels = _all_data()
    index = split_indices(split)
    return images[index].copy(), labels[index].copy()


def write_calib_npz(path: str | Path, split: str = "calib", n: int | None = None) -> Path:
    """Write ``split``'s first ``n`` images (all when None) as a calibration npz."""
    x, _ = data(split)
    if n is not None:
        x = x[:n]
    path = Path(path)
    np.savez(path, **{INPUT_NAME: x})
    return path


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def make_module():
    """The untrained CNN: 3 × (Conv3×3 + BN + ReLU) with two max-pools, Flatten → Linear."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 32),
        nn.Flatten(),
        nn.Linear(32 * (SIDE // 4) ** 2, 10),
    ).to(torch.float32)


@functools.cache
def _trained_state() -> dict[str, Any]:
    """Train once per process; the state dict (cloned tensors) is reused by every caller."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(TRAIN_SEED)
        module = make_module()
        x, y = (torch.from_numpy(a) for a in data("train"))
        optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
        # Batch order from numpy, not torch's global generator: nothing else can perturb it.
        rng = np.random.default_rng(TRAIN_SEED)
        module.train()
        for _ in range(EPOCHS):
            for batch in np.array_split(rng.permutation(len(y)), len(y) // BATCH):
                index = torch.from_numpy(batch)
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(module(x[index]), y[index])
                loss.backward()
                optimizer.step()
        module.eval()
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def build_torch_model():
    """The trained CNN (eval mode), identical to the one the catalog's ``digits`` exports."""
    module = make_module()
    module.load_state_dict(_trained_state())
    return module.eval()


def torch_accuracy(module, split: str = "test") -> float:
    import torch

    x, y = data(split)
    with torch.no_grad():
        return accuracy(module(torch.from_numpy(x)).numpy(), y)


def build_digits(path: Path) -> dict[str, Any]:
    import torch

    from graphopt.models.export import export

    module = build_torch_model()
    example = torch.from_numpy(data("calib")[0][:EXPORT_BATCH])
    info = export(
        module,
        (example,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic={INPUT_NAME: {0: "batch"}},
    )
    return {
        **info,
        "versions": {**info["versions"], **versions("scikit-learn")},
        "source": (
            f"graphopt.models.digits: CNN trained {EPOCHS} epochs on sklearn digits "
            f"(upsampled to {SIDE}x{SIDE}), seeds {SPLIT_SEED}/{TRAIN_SEED}"
        ),
        "test_accuracy": round(torch_accuracy(module), 4),
        "splits": {s: len(split_indices(s)) for s in SPLITS},
        "test_shapes": {INPUT_NAME: [1, 1, SIDE, SIDE]},
    }


register(
    ModelSpec(
        name="digits",
        family="trained",
        description=f"small CNN trained on sklearn digits ({SIDE}x{SIDE}), real weights",
        builder=build_digits,
        requires=("torch", "sklearn"),
    )
)
