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
rename) and never over a file the run reads (the model, its external data, the images, the
text file, the tokenizer). Every user mistake is a one-line
:class:`~graphopt.errors.UserInputError` (exit code 2), and so is an option the chosen
source does not use (an image option with ``--text``, a text option with ``--images``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import zipfile
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
    # One side for every symbolic image dim, or (height, width): ``--size 224``/``48x320``.
    size: int | tuple[int, int] | None = None
    resize: int | None = None
    crop: str | None = None  # "center" (the default) or "none"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    layout: str | None = None
    channels: str | None = None  # "rgb" (the default) or "bgr"
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
            size=parse_size(args.size),
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


# The options each source reads; one given with the other source is refused, not ignored.
_IMAGE_OPTIONS = (
    ("--size", "size"),
    ("--resize", "resize"),
    ("--crop", "crop"),
    ("--mean", "mean"),
    ("--std", "std"),
    ("--layout", "layout"),
    ("--channels", "channels"),
    ("--scale", "scale"),
)
_TEXT_OPTIONS = (("--tokenizer", "tokenizer"), ("--seq-len", "seq_len"))
_CHOICES = (
    ("--crop", "crop", ("center", "none")),
    ("--layout", "layout", ("nchw", "nhwc")),
    ("--channels", "channels", ("rgb", "bgr")),
)
# Fixed so that the same arrays give the same bytes (zipfile's own default, made explicit).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` as floats; None when not given."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    # An empty part ("1,,2,3") is a slip, not a separator: taking three values from it would
    # normalize with numbers the user did not mean.
    if not all(parts):
        raise UserInputError(f"{flag} {text!r}: empty value; expected comma-separated numbers")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not all(np.isfinite(values)):
        raise UserInputError(f"{flag} {text!r}: expected comma-separated finite numbers")
    return values


def parse_size(text: str | int | None) -> int | tuple[int, int] | None:
    """``--size``: ``"224"`` (every symbolic image dim) or ``"48x320"`` (height x width)."""
    if text is None or isinstance(text, int):
        return text
    parts = text.strip().lower().split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise UserInputError(
            f"--size {text!r}: expected a positive whole number (224) or HEIGHTxWIDTH (48x320)"
        )
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def build_calibration(request: CalibRequest) -> CalibResult:
    """Build the arrays ``request`` asks for from the model's inputs and write the ``.npz``."""
    from graphopt.io import load

    if (request.images is None) == (request.text is None):
        raise UserInputError("calib: give exactly one of --images FOLDER or --text FILE")
    _check_options_fit_source(request)
    sizes = request.size if isinstance(request.size, tuple) else (request.size,)
    for flag, number in (
        ("--limit", request.limit),
        ("--seq-len", request.seq_len),
        *(("--size", side) for side in sizes),
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
    if request.images is not None:
        require("PIL", "pillow", "--images")
        from graphopt.calib_images import image_arrays, image_files

        files = image_files(Path(os.fspath(request.images)))
        _check_not_read(model_path, output, [("an --images file", path) for path in files])
        arrays = image_arrays(load(model_path).model, request, files)
        source = "images"
    else:
        require("tokenizers", "tokenizers", "--text")
        from graphopt.calib_text import text_arrays, tokenizer_file

        if request.tokenizer is None:
            raise UserInputError("--text needs --tokenizer PATH (a tokenizer.json or its folder)")
        tokenizer = tokenizer_file(request.tokenizer)
        read = [
            ("the --text file", Path(os.fspath(request.text))),
            ("the --tokenizer file", tokenizer),
        ]
        _check_not_read(model_path, output, read)
        arrays = text_arrays(load(model_path).model, request, tokenizer)
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


def _check_options_fit_source(request: CalibRequest) -> None:
    """Refuse an option the chosen source never reads (it would be silently ignored), and a
    choice option (API callers pass strings) that is none of its choices."""
    images = request.images is not None
    unused = _TEXT_OPTIONS if images else _IMAGE_OPTIONS
    given = [flag for flag, field in unused if getattr(request, field) is not None]
    if given:
        source, other = ("--images", "--text") if images else ("--text", "--images")
        raise UserInputError(
            f"{', '.join(given)}: not used with {source} (only with {other}); drop "
            f"{'it' if len(given) == 1 else 'them'}"
        )
    for flag, field, choices in _CHOICES:
        value = getattr(request, field)
        if value is not None and value not in choices:
            raise UserInputError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
    if request.resize is not None and request.crop == "none":
        raise UserInputError(
            "--resize: not used with --crop none (the whole image is resized to the input's "
            "size); drop --resize, or use --crop center"
        )


def _check_not_read(model: Path, output: Path, read: list[tuple[str, Path]]) -> None:
    """Refuse, before any work, an output that is a file the run reads: the model's external
    data (found in its header), an image, the text file, the tokenizer (run_files'
    same-file test: the same inode, links included, else the same resolved path). Writing
    comes last, so nothing would fail, and the user's file would be gone."""
    from graphopt.api import OptimizeOptions
    from graphopt.run_files import check_overwrites

    check_overwrites(model, output, OptimizeOptions(), also_read=read)


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
    """The ``.npz`` ``numpy.savez`` writes, to ``path`` atomically
    (:func:`graphopt.io.write_file_atomically`): a kill midway leaves the old file (or none),
    never a torn archive."""
    from graphopt.io import write_file_atomically

    write_file_atomically(path, lambda handle: _write_npz(handle, arrays))


def _write_npz(handle, arrays: dict[str, np.ndarray]) -> None:
    # Not np.savez(handle, **arrays): its own keywords take the inputs of those names (an
    # input named "allow_pickle" vanished, one named "file" crashed). The same archive it
    # writes: one stored NAME.npy member per array, zip64 headers, a fixed date.
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            with archive.open(member, mode="w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asanyarray(array), allow_pickle=False)
