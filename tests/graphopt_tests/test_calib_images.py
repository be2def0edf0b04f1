"""``graphopt calib --images``: decoding, resizing and cropping, normalization limits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto

from graphopt.calibration import load_npz
from graphopt_tests.helpers import import_or_skip
from graphopt_tests.test_calib_builder import PIL_REASON, _calib, _image_model, _images


def _pil():
    return import_or_skip("PIL.Image", PIL_REASON)


def _random_image(size: tuple[int, int], seed: int = 0):
    """A random RGB PIL image of ``size`` (width, height)."""
    image = _pil()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return image.fromarray(pixels, "RGB")


def test_a_png_with_a_broken_chunk_is_a_one_line_error_naming_it(tmp_path, capsys):
    """PIL reports a chunk length running past its data as SyntaxError: exit 3 before."""
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    folder = tmp_path / "imgs"
    folder.mkdir()
    path = folder / "broken.png"
    _random_image((8, 8)).save(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4  # the chunk's length field
    assert int.from_bytes(data[at : at + 4], "big") > 16
    data[at : at + 4] = (16).to_bytes(4, "big")  # the next "chunk" starts inside the data
    path.write_bytes(bytes(data))
    code, msg = _calib(capsys, model, "-o", tmp_path / "c.npz", "--images", folder)
    assert code == 2, msg
    assert f"{path}: cannot read image (broken PNG file" in msg
    assert msg.strip().count("\n") == 0, msg


def test_a_palette_png_with_transparency_gives_no_warning(tmp_path, capsys):
    """PIL's multi-line UserWarning ("should be converted to RGBA") reached stderr."""
    image = _pil()
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    folder = tmp_path / "imgs"
    folder.mkdir()
    palette = image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").convert("P")
    palette.save(folder / "p.png", transparency=bytes([0, 128] + [255] * 254))
    assert isinstance(image.open(folder / "p.png").info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning raised inside calib fails the run
        code, msg = _calib(capsys, model, "-o", tmp_path / "c.npz", "--images", folder)
    assert code == 0, msg
    assert "Transparency" not in msg and load_npz(tmp_path / "c.npz")["x"].shape == (1, 3, 8, 8)


def test_resize_and_crop_follow_torchvision_formulas():
    """The long side truncated (was rounded), the crop offset rounded (was floored)."""
    from graphopt.calib_images import crop_offsets, resized_size

    # int(4 * 7 / 5) = int(5.6) = 5, where round gave 6; the shorter side can be either.
    assert resized_size((7, 5), 4) == (5, 4)
    assert resized_size((5, 7), 4) == (4, 5)
    assert resized_size((10, 10), 3) == (3, 3)
    # round((10 - 3) / 2) = round(3.5) = 4 (floor: 3); round(2.5) = 2, to even.
    assert crop_offsets((10, 9), (4, 3)) == (4, 2)
    assert crop_offsets((8, 8), (8, 8)) == (0, 0)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("image_size", "crop", "resize"),
    [
        ((37, 23), (8, 8), 13),
        ((23, 37), (7, 7), None),
        ((50, 31), (9, 12), 17),
        ((13, 13), (5, 3), 6),
    ],
)
def test_centre_crop_matches_torchvision_pixel_for_pixel(image_size, crop, resize):
    transforms = import_or_skip(
        "torchvision.transforms", "the reference Resize + CenterCrop is torchvision's"
    )
    from graphopt.calib_images import _fit

    image = _random_image(image_size)
    side = resize or max(crop)
    expected = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(crop)])(image)
    got = _fit(image, crop, "center", resize)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def _record_resizes(monkeypatch) -> list[tuple[int, int]]:
    """The (width, height) of every PIL resize from now on."""
    from PIL import Image

    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


def test_an_extreme_aspect_ratio_resizes_only_the_crop(monkeypatch):
    """A 1x40000 image (198 bytes of PNG) took 8 GB: the whole image was resized to the
    crop's shorter side first (224 x 8960000). Now only the cropped region is resized."""
    from graphopt import calib_images

    sizes = _record_resizes(monkeypatch)
    thin = _random_image((1, 40000))
    got = calib_images._fit(thin, (224, 224), "center", None)
    assert got.size == (224, 224)
    assert max(w * h for w, h in sizes) <= calib_images.MAX_RESIZE_PIXELS
    # The region path gives the same geometry as resizing everything, pixels a level or two
    # apart from float rounding: forced here on an ordinary image to compare.
    image = _random_image((41, 29), seed=1)
    whole = np.asarray(calib_images._fit(image, (16, 16), "center", 23), np.int16)
    monkeypatch.setattr(calib_images, "MAX_RESIZE_PIXELS", 0)
    region = np.asarray(calib_images._fit(image, (16, 16), "center", 23), np.int16)
    assert region.shape == whole.shape and np.abs(region - whole).max() <= 2


def test_a_huge_resize_is_read_without_a_huge_copy(tmp_path, capsys, monkeypatch):
    from graphopt.calib_images import MAX_RESIZE_PIXELS

    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    _images(tmp_path / "imgs", 2, size=(12, 10))
    out = tmp_path / "c.npz"
    sizes = _record_resizes(monkeypatch)
    code, msg = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", "--resize", "40000")
    assert code == 0, msg
    assert load_npz(out)["x"].shape == (2, 3, 8, 8)
    # A 48000x40000 copy of each image before (5.4 GiB).
    assert sizes and max(w * h for w, h in sizes) <= MAX_RESIZE_PIXELS


@pytest.mark.parametrize(
    ("dtype", "std", "type_name"),
    [(TensorProto.FLOAT, "1e-45", "float32"), (TensorProto.FLOAT16, "0.00001", "float16")],
)
def test_normalization_that_overflows_is_refused(tmp_path, capsys, dtype, std, type_name):
    """A tiny --std wrote infinities (numpy's overflow RuntimeWarning on stderr, exit 0)."""
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8], dtype=dtype)
    _images(tmp_path / "imgs", 2, size=(8, 8))
    out = tmp_path / "c.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning would fail the run
        code, msg = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", "--std", std)
    assert code == 2, msg
    assert f"input 'x': (pixel / --scale - --mean) / --std overflows {type_name}" in msg, msg
    assert msg.strip().count("\n") == 0, msg
    assert not out.exists()


def test_what_the_folder_scan_reads_and_skips(tmp_path):
    """As the README says: image suffixes in any case, subfolders and links to files read;
    hidden files and folders and links to folders skipped."""
    from graphopt.calib_images import image_files

    folder = tmp_path / "imgs"
    _images(folder, 3, size=(4, 4))  # img00.png, img01.png, sub/img02.png
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "a.png").write_bytes(b"")
    (folder / "._img00.png").write_bytes(b"")  # a macOS resource fork
    (folder / "UPPER.PNG").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"")
    (folder / "linked_folder").symlink_to(outside, target_is_directory=True)
    (folder / "linked.png").symlink_to(folder / "img00.png")
    found = [path.relative_to(folder).as_posix() for path in image_files(folder)]
    assert found == ["UPPER.PNG", "img00.png", "img01.png", "linked.png", "sub/img02.png"]
