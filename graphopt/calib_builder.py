"""``graphopt calib``: a calibration ``.npz`` built from a folder of images or a text file.

Quantizing or pruning with real data needs an ``.npz`` holding one array per model input
(graphopt's convention: samples laid end to end along the batch axis, ``[N, ...]``). This
module writes one without the user writing numpy: the model says which inputs there are,
their dtype and their fixed dims; the data fills the symbolic ones (the batch from the
number of samples, the image size or sequence length from the options).

- **Images** (:mod:`graphopt.calib_images`): the model's one image-like input, from the
  image files of a folder (PIL), resized, cropped and normalized as the options say.
- **Text** (:mod:`graphopt.calib_text`): token inputs (ids, attention mask, token types)
  from a text file of one sentence per line, with a tokenizer read from a local
  ``tokenizer.json`` (the ``tokenizers`` library; nothing is downloaded).

Samples come in sorted order (file paths, or line order), so the same folder and options
give the same bytes; ``seed`` shuffles them with a seeded permutation before ``limit`` takes
the first ones. The output is written atomically (a temporary file beside it, then a
rename) and never over the model. Every user mistake is a one-line
:class:`~graphopt.errors.UserInputError` (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from graphopt.errors import UserInputError


@dataclass
class CalibRequest:
    """What ``graphopt calib`` was asked for (None: not given, the default applies)."""

    model: str | os.PathLike
    output: str | os.PathLike
    images: str | os.PathLike | None = None
    text: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    size: int | None = None
    resize: int | None = None
    crop: str = "center"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    layout: str | None = None
    channels: str = "rgb"
    scale: float | None = None
    limit: int | None = None
    seed: int | None = None
    seq_len: int | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> CalibRequest:
        """The request the CLI's parsed ``calib`` arguments make."""
        return cls(
            model=args.input,
            output=args.output,
            images=args.images,
            text=args.text,
            tokenizer=args.tokenizer,
            size=args.size,
            resize=args.resize,
            crop=args.crop,
            mean=parse_floats(args.mean, "--mean"),
            std=parse_floats(args.std, "--std"),
            layout=args.layout,
            channels=args.channels,
            scale=args.scale,
            limit=args.limit,
            seed=args.seed,
            seq_len=args.seq_len,
        )


@dataclass
class CalibResult:
    """What was written: the file, the arrays' shapes and dtypes, and from how many samples."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    count: int
    source: str  # "images" or "sentences"

    def describe(self) -> str:
        arrays = ", ".join(
            f"{name} {self.dtypes[name]} [{'x'.join(map(str, shape))}]"
            for name, shape in self.shapes.items()
        )
        return f"wrote {self.path}: {arrays} from {self.count} {self.source}"


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` as floats; None when not given."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or not all(np.isfinite(values)):
        raise UserInputError(f"{flag} {text!r}: expected comma-separated finite numbers")
    return values


def build_calibration(request: CalibRequest) -> CalibResult:
    """Build the arrays ``request`` asks for from the model's inputs and write the ``.npz``."""
    from graphopt.io import load

    if (request.images is None) == (request.text is None):
        raise UserInputError("calib: give exactly one of --images FOLDER or --text FILE")
    for flag, number in (
        ("--limit", request.limit),
        ("--seq-len", request.seq_len),
        ("--size", request.size),
        ("--resize", request.resize),
    ):
        if number is not None and number < 1:
            raise UserInputError(f"{flag} {number}: expected a positive whole number")
    if request.seed is not None and request.seed < 0:
        raise UserInputError(f"--seed {request.seed}: expected a whole number >= 0")
    if request.scale is not None and not (np.isfinite(request.scale) and request.scale > 0):
        raise UserInputError(f"--scale {request.scale}: expected a positive finite number")
    model_path = Path(os.fspath(request.model))
    output = Path(os.fspath(request.output))
    _check_not_model(model_path, output)
    model = load(model_path).model
    if request.images is not None:
        require("PIL", "pillow", "--images")
        from graphopt.calib_images import image_arrays

        arrays = image_arrays(model, request)
        source = "images"
    else:
        require("tokenizers", "tokenizers", "--text")
        from graphopt.calib_text import text_arrays

        arrays = text_arrays(model, request)
        source = "sentences"
    write_npz_atomic(output, arrays)
    first = next(iter(arrays.values()))
    return CalibResult(
        path=output,
        shapes={name: tuple(a.shape) for name, a in arrays.items()},
        dtypes={name: str(a.dtype) for name, a in arrays.items()},
        count=int(first.shape[0]),
        source=source,
    )


def require(module: str, package: str, flag: str) -> None:
    """A one-line error naming the package to install when ``module`` is missing (Pillow
    and tokenizers come with the [calib] or [torch] extra, not with graphopt itself)."""
    if find_spec(module) is None:
        raise UserInputError(
            f"calib {flag} needs the {package} package: pip install {package} (or graphopt[calib])"
        )


def pick(items: Sequence, limit: int | None, seed: int | None) -> list:
    """``items`` (already in sorted order), shuffled by ``seed`` if given, then the first
    ``limit``: a seeded random subset instead of always the first files."""
    chosen = list(items)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(chosen))
        chosen = [chosen[i] for i in order]
    return chosen if limit is None else chosen[:limit]


def _check_not_model(model: Path, output: Path) -> None:
    # Writing the calibration data over the model (a slip of -o) would destroy it.
    same = output.resolve() == model.resolve()
    if not same and output.exists() and model.exists():
        with contextlib.suppress(OSError):
            same = output.samefile(model)
    if same:
        raise UserInputError(f"{output}: is the model itself; give another output file (-o)")
    if output.suffix.lower() == ".onnx":
        raise UserInputError(f"{output}: calibration data is an .npz file, not .onnx")


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` to ``path`` atomically (:func:`graphopt.io.write_file_atomically`): a
    kill midway leaves the old file (or none), never a torn archive."""
    from graphopt.io import write_file_atomically

    write_file_atomically(path, lambda handle: np.savez(handle, **arrays))
