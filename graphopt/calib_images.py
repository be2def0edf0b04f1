"""Calibration arrays for a model's image input, from the image files of a folder.

The image input is the model's rank-4 input with 1 or 3 channels at axis 1 (NCHW) or axis
3 (NHWC); ``--layout`` settles a model whose input could be either. Each file (sorted by
path, subfolders included; see :func:`image_files` for what is read) is opened with PIL,
converted to RGB (or grayscale for one channel), resized and cropped to the input's height
and width, and for a float input scaled and normalized: ``(pixel / scale - mean) / std``.
An integer input (uint8) takes the raw pixels. Fixed dims come from the model; ``--size``
gives the symbolic ones (224 when neither says): ``--size N`` every symbolic one,
``--size HxW`` height and width, each agreeing with the model where it fixes the dim.

Cropping (``--crop center``, the default): the shorter side is resized to ``--resize``
(default: the larger side of the crop), then the centre ``height x width`` is cut out,
with the sizes and offsets torchvision's ``Resize(resize)`` + ``CenterCrop((h, w))``
compute (PIL bilinear, as torchvision uses for PIL images), so the pixels are theirs. An
image whose resized copy would pass ``MAX_RESIZE_PIXELS`` (an extreme aspect ratio, a
huge ``--resize``) has only the cropped region resized, as PIL's ``box`` allows: the same
geometry, pixels within one or two levels of torchvision's, without allocating the whole
resized image. ``--crop none`` resizes the whole image to the input's size, aspect ratio
not kept.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.input_dims import graph_inputs

if TYPE_CHECKING:
    from PIL import Image

    from graphopt.calib_builder import CalibRequest

IMAGE_SUFFIXES = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
DEFAULT_SIZE = 224
DEFAULT_SCALE = 255.0
# The largest calibration array calib writes: a few times this is held while it is built.
MAX_CALIB_BYTES = 4 << 30
# The largest resized copy of one image made before cropping (16M pixels: 48 MiB in RGB,
# far above a photo resized for a model, 256x341); past it only the cropped region is
# resized. A 1x40000 image resized to a shorter side of 224 was a 224x8960000 copy (6 GB)
# for a 224x224 crop.
MAX_RESIZE_PIXELS = 1 << 24
CHANNELS = (1, 3)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_PIXEL_TYPES = (ir.DataType.UINT8,)


def image_arrays(
    model: ir.Model, request: CalibRequest, files: list[Path] | None = None
) -> dict[str, np.ndarray]:
    """``{input name: [N, ...] array}`` for the model's image input from ``request.images``
    (``files``: its :func:`image_files`, when the caller has them already)."""
    value, layout = image_input(model, request.layout)
    others = [v.name for v in graph_inputs(model) if v is not value]
    if others:
        raise UserInputError(
            f"model input(s) {', '.join(map(repr, others))} are not images; --images fills "
            f"only the image input {value.name!r}"
        )
    # The batch is axis 0 in both layouts; samples are laid end to end along it.
    if not _free_batch(value.shape[0]):
        raise UserInputError(
            f"input {value.name!r} has a fixed batch of {value.shape[0]}; calib "
            "writes one sample per image and needs a batch dim that is 1 or symbolic"
        )
    channels, height, width = _image_dims(value, layout, request.size)
    crop = request.crop or "center"
    if crop == "center" and request.resize is not None and request.resize < max(height, width):
        # torchvision would pad the crop with black; raising it silently read other pixels.
        raise UserInputError(
            f"--resize {request.resize}: smaller than the {height}x{width} crop; give at "
            f"least {max(height, width)} (or leave it out: the crop's larger side)"
        )
    float_input = value.dtype in _FLOAT_TYPES
    if not float_input and value.dtype not in _PIXEL_TYPES:
        raise UserInputError(
            f"input {value.name!r} has dtype {value.dtype}; calib writes float or uint8 images"
        )
    if not float_input and (request.mean or request.std or request.scale is not None):
        raise UserInputError(
            f"input {value.name!r} takes uint8 pixels; --mean, --std and --scale apply to "
            "float inputs only"
        )
    mean = _per_channel(request.mean, channels, "--mean", 0.0)
    std = _per_channel(request.std, channels, "--std", 1.0)
    if np.any(std == 0):
        raise UserInputError("--std: a standard deviation of 0 divides by zero")
    scale = DEFAULT_SCALE if request.scale is None else float(request.scale)
    if scale <= 0:
        raise UserInputError(f"--scale {request.scale}: expected a positive number")
    from graphopt.calib_builder import pick

    if files is None:
        files = image_files(Path(request.images))
    files = pick(files, request.limit, request.seed)
    _check_size(value, len(files), channels, height, width, float_input)
    pixels = np.stack(
        [_load(path, channels, (height, width), crop, request.resize) for path in files]
    )  # [N, H, W, C] uint8
    if request.channels == "bgr":
        pixels = pixels[..., ::-1]
    data = _normalized(value, pixels, scale, mean, std) if float_input else pixels
    if layout == "nchw":
        data = data.transpose(0, 3, 1, 2)
    return {value.name: np.ascontiguousarray(data)}


def _normalized(
    value: ir.Value, pixels: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """``(pixel / scale - mean) / std`` in the input's float type; refused where that is not
    finite (a tiny --std overflowed to inf: numpy warned on stderr, and the file was written)."""
    dtype = value.dtype.numpy()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        data = (pixels.astype(np.float32) / np.float32(scale) - mean) / std
        data = data.astype(dtype)
    if not np.isfinite(data).all():
        raise UserInputError(
            f"input {value.name!r}: (pixel / --scale - --mean) / --std overflows {dtype} "
            f"(largest finite {float(np.finfo(dtype).max):.4g}); check --std and --scale"
        )
    return data


def image_input(model: ir.Model, layout: str | None) -> tuple[ir.Value, str]:
    """The model's image-like input and its layout ("nchw" or "nhwc")."""
    found = []
    for value in graph_inputs(model):
        if value.shape is None or len(value.shape) != 4:
            continue
        if value.dtype not in _FLOAT_TYPES + _PIXEL_TYPES:
            continue
        fits = [
            name
            for name, axis in (("nchw", 1), ("nhwc", 3))
            if layout in (None, name)
            and (value.shape[axis] in CHANNELS or (layout == name and _symbolic(value.shape[axis])))
        ]
        if len(fits) > 1:
            # [N, 3, H, 3]: a guess would fill a width-3 image with channels, or the reverse.
            raise UserInputError(
                f"input {value.name!r} {_dims(value)} could be NCHW or NHWC: give --layout "
                "nchw or --layout nhwc"
            )
        found.extend((value, name) for name in fits)
    described = ", ".join(f"{v.name!r} {v.dtype} {_dims(v)}" for v in graph_inputs(model)) or "none"
    if not found:
        wanted = "a float or uint8 rank-4 input with 1 or 3 channels"
        wanted += f" ({layout.upper()})" if layout else " (NCHW or NHWC)"
        raise UserInputError(
            f"model has no image-like input: expected {wanted}; inputs: {described}"
        )
    if len(found) > 1:
        raise UserInputError(f"model has several image-like inputs ({described}); calib fills one")
    return found[0]


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted by path: every file with an image suffix
    (``IMAGE_SUFFIXES``, any case) in it and its subfolders, symbolic links to files
    included. Not read: hidden files and folders (a name starting with "."; macOS's
    ``._photo.jpg`` resource forks carry an image suffix but are no images) and symbolic
    links to folders (``Path.rglob`` does not follow them, which also keeps a link loop from
    recursing forever). The README's "Calibration data" says the same."""
    if not folder.exists():
        raise UserInputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: not a folder (--images takes a folder of images)")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UserInputError(f"{folder}: no images found (looked for {suffixes})")
    return files


def _load(
    path: Path, channels: int, size: tuple[int, int], crop: str, resize: int | None
) -> np.ndarray:
    """One image as uint8 [H, W, C]."""
    from PIL import Image, UnidentifiedImageError

    try:
        # PIL warns (two lines on stderr) between 89M and 179M pixels and refuses above: such
        # an image is read like any other, as PIL allows, without the warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            image = _as_8_bit(image, path)
            with warnings.catch_warnings():
                # A palette PNG with transparency: PIL suggests converting to RGBA first, in
                # a multi-line warning. The alpha is dropped either way (the input takes RGB
                # or grayscale), so the advice does not apply here.
                warnings.filterwarnings(
                    "ignore", message="Palette images with Transparency", category=UserWarning
                )
                image = image.convert("L" if channels == 1 else "RGB")
            image = _fit(image, size, crop, resize)
            array = np.asarray(image, dtype=np.uint8)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        Image.DecompressionBombError,
        # PIL's decoders report a corrupt file with these too: a PNG chunk with a broken
        # length raises SyntaxError("broken PNG file"), a short header EOFError or
        # struct.error.
        SyntaxError,
        EOFError,
        struct.error,
    ) as exc:
        raise UserInputError(f"{path}: cannot read image ({exc})") from None
    return array[..., None] if array.ndim == 2 else array


def _check_size(
    value: ir.Value, count: int, channels: int, height: int, width: int, float_input: bool
) -> None:
    """Refuse an output larger than ``MAX_CALIB_BYTES`` before reading an image: a mistyped
    ``--size`` would otherwise allocate until the system kills the process, without a word."""
    itemsize = value.dtype.itemsize if float_input else 1
    total = count * channels * height * width * itemsize
    if total > MAX_CALIB_BYTES:
        raise UserInputError(
            f"input {value.name!r} at {height}x{width}: {count} images would take "
            f"{total / 2**30:.1f} GiB (limit {MAX_CALIB_BYTES >> 30} GiB); use a smaller "
            "--size or --limit"
        )


def _as_8_bit(image: Image.Image, path: Path) -> Image.Image:
    """A single-channel 16-bit image scaled to 8 bits (65535 -> 255). PIL's ``convert``
    clips such pixels at 255 instead, which turned most of a 16-bit PNG white. A 32-bit
    integer or float image has no range to scale from: refused."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        # Mode "I" holds 16-bit PNGs and PGMs and 32-bit TIFFs alike; a TIFF's declared
        # depth tells them apart even when its pixels happen to fit in 16 bits.
        declared = _declared_bits(image)
        if image.mode == "I" and (declared > 16 or pixels.min() < 0 or pixels.max() > 65535):
            raise UserInputError(f"{path}: 32-bit integer image; convert it to 8 or 16 bits")
        return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8), "L")
    if image.mode == "F":
        raise UserInputError(
            f"{path}: floating-point image, whose pixel range is unknown; convert it to 8 or "
            "16 bits"
        )
    return image


def _declared_bits(image: Image.Image) -> int:
    """Bits per sample the file declares (TIFF's BitsPerSample tag), else 16 (the depth
    Pillow's other formats open as mode "I" have)."""
    tags = getattr(image, "tag_v2", None)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        bits = tags.get(258) if tags is not None else None
        if bits:
            return max(int(b) for b in (bits if isinstance(bits, tuple) else (bits,)))
    return 16


def _fit(image: Image.Image, size: tuple[int, int], crop: str, resize: int | None) -> Image.Image:
    from PIL import Image

    height, width = size
    if crop == "none":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    # The caller refused a --resize below the crop, so the resized image holds the crop.
    new_w, new_h = resized_size(image.size, resize or max(height, width))
    left, top = crop_offsets((new_w, new_h), (height, width))
    if new_w * new_h <= MAX_RESIZE_PIXELS:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        return image.crop((left, top, left + width, top + height))
    # Only the region the crop takes, in source pixels: PIL resizes it with the scale the
    # whole image would have had. Its filter still reads the pixels around the region, so
    # only float rounding differs from resizing everything (within a level or two).
    scale_x, scale_y = image.size[0] / new_w, image.size[1] / new_h
    box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return image.resize((width, height), Image.Resampling.BILINEAR, box=box)


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` (width, height) whose shorter side is resized
    to ``shorter``: torchvision's ``Resize(int)`` formula, the longer side truncated."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shorter * long / short)
    return (shorter, new_long) if w <= h else (new_long, shorter)


def crop_offsets(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of the centre ``crop`` (height, width) of an image of ``size`` (width,
    height): torchvision's ``CenterCrop``, ``int(round((side - crop) / 2))`` (Python's round,
    halves to even)."""
    (w, h), (crop_h, crop_w) = size, crop
    return round((w - crop_w) / 2.0), round((h - crop_h) / 2.0)


def _image_dims(
    value: ir.Value, layout: str, size: int | tuple[int, int] | None
) -> tuple[int, int, int]:
    """(channels, height, width): fixed dims from the model, ``size`` for symbolic ones.

    ``size`` N sets every symbolic dim (a model fixing both to other sizes refuses it: it
    would set nothing); (H, W) sets each, and must agree with a dim the model fixes."""
    shape = value.shape
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
    channels = shape[c_axis] if isinstance(shape[c_axis], int) and shape[c_axis] > 0 else 3
    fixed = [
        dim if isinstance(dim, int) and dim > 0 else None for dim in (shape[h_axis], shape[w_axis])
    ]
    asked = size if isinstance(size, tuple) else (size, size)
    if any(side is not None and side < 1 for side in asked):
        raise UserInputError(f"--size {_size_text(size)}: expected a positive number of pixels")
    if isinstance(size, tuple):
        wrong = any(dim is not None and side != dim for side, dim in zip(size, fixed, strict=True))
    else:
        wrong = size is not None and None not in fixed and fixed != [size, size]
    if wrong:
        # An N refused here met no symbolic dim: it would set nothing.
        detail = "" if isinstance(size, tuple) else ", no symbolic image dim for --size to set"
        raise UserInputError(
            f"--size {_size_text(size)}: input {value.name!r} is fixed at {_dims(value)}{detail}"
        )
    height, width = (
        dim if dim is not None else (given or DEFAULT_SIZE)
        for dim, given in zip(fixed, asked, strict=True)
    )
    return channels, height, width


def _size_text(size: int | tuple[int, int] | None) -> str:
    return "x".join(map(str, size)) if isinstance(size, tuple) else str(size)


def _per_channel(values, channels: int, flag: str, default: float) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    if len(values) not in (1, channels):
        raise UserInputError(f"{flag}: {len(values)} values for an input of {channels} channels")
    return np.broadcast_to(np.asarray(values, np.float32), (channels,)).copy()


def _free_batch(dim) -> bool:
    return dim == 1 or _symbolic(dim)


def _symbolic(dim) -> bool:
    return not isinstance(dim, int) or dim < 0


def _dims(value: ir.Value) -> str:
    if value.shape is None:
        return "[?]"
    dims = (str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape)
    return "[" + ",".join(dims) + "]"
