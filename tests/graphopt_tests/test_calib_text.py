"""``graphopt calib --text``: reading sentences, tokenizer failures, the model's batch."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from graphopt.calibration import load_npz
from graphopt_tests.helpers import import_or_skip
from graphopt_tests.test_calib_builder import _calib, _token_model, _word_level_tokenizer

TOKENIZERS_REASON = "graphopt calib --text reads tokenizers with `tokenizers`"


def _tokenizer_folder(tmp_path, edit=None):
    """tmp_path/tok holding the word-level tokenizer.json, changed by ``edit(dict)``."""
    import_or_skip("tokenizers", TOKENIZERS_REASON)
    spec = json.loads(_word_level_tokenizer())
    if edit is not None:
        edit(spec)
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def _sentences(tmp_path, text="a sentence\n"):
    path = tmp_path / "s.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _drop_unknown_token(spec):
    del spec["model"]["vocab"]["[UNK]"]


def _broken_precompiled_normalizer(spec):
    spec["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAAAAAAAAAAAAAA"}


@pytest.mark.parametrize("edit", [_drop_unknown_token, _broken_precompiled_normalizer])
def test_a_tokenizer_that_fails_to_encode_is_a_one_line_error_naming_it(tmp_path, capfd, edit):
    """A WordLevel vocabulary without its [UNK] raised a plain Exception (exit 3); a broken
    Precompiled normalizer panicked in Rust: panic text, backtrace and traceback, exit 1."""
    folder = _tokenizer_folder(tmp_path, edit)
    text = _sentences(tmp_path, "a sentence\nunknown words here\n")
    out = tmp_path / "t.npz"
    code, msg = _calib(
        capfd, _token_model(tmp_path / "m.onnx"), "-o", out, "--text", text, "--tokenizer", folder
    )
    assert code == 2, msg
    assert f"{folder / 'tokenizer.json'}: cannot encode the text" in msg, msg
    # capfd: also what Rust's panic hook writes to file descriptor 2 directly.
    assert msg.strip().count("\n") == 0, msg
    assert "panicked" not in msg and "Traceback" not in msg
    assert not out.exists()


def test_stderr_of_a_tokenizer_call_that_succeeds_is_passed_on(tmp_path, capfd):
    from graphopt.calib_text import _tokenizer_call

    def noisy() -> int:
        os.write(2, b"a library's own note\n")
        return 7

    assert _tokenizer_call(tmp_path / "tokenizer.json", "cannot encode the text", noisy) == 7
    assert capfd.readouterr().err == "a library's own note\n"


def test_a_fixed_batch_above_one_is_refused_like_images(tmp_path, capsys):
    """txt_b4.onnx: a file of batch 2 was written, which optimize --calib then refused."""
    folder = _tokenizer_folder(tmp_path)
    text = _sentences(tmp_path, "a sentence\nsentence a\n")
    out = tmp_path / "t.npz"
    fixed = _token_model(tmp_path / "b4.onnx", names=("input_ids", "attention_mask"))
    model = onnx.load(fixed)
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, fixed)
    code, msg = _calib(capsys, fixed, "-o", out, "--text", text, "--tokenizer", folder)
    assert code == 2, msg
    assert "input 'input_ids' has a fixed batch of 4; calib writes one sample per sentence" in msg
    assert not out.exists()
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, fixed)  # batch 1: one sentence per row, fed one at a time
    code, msg = _calib(capsys, fixed, "-o", out, "--text", text, "--tokenizer", folder)
    assert code == 0, msg
    assert load_npz(out)["input_ids"].shape == (2, 128)


def test_sentences_skip_a_bom_and_split_only_at_line_ends(tmp_path):
    """The BOM was tokenized into the first sentence; splitlines() also split at form feeds,
    \\x1c-\\x1e, \\x85 and U+2028/U+2029 inside a sentence."""
    from graphopt.calib_text import read_sentences

    path = tmp_path / "s.txt"
    inside = "a\x0cb\x1cc\x1dd\x1ee\x85f\u2028g\u2029h"
    path.write_bytes(("\ufefffirst\r\n" + inside + "\rthird\n\n last \n").encode("utf-8"))
    assert read_sentences(path) == ["first", inside, "third", "last"]


def test_a_bom_is_not_tokenized(tmp_path, capsys):
    folder = _tokenizer_folder(tmp_path)
    model = _token_model(tmp_path / "m.onnx")
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(b"a sentence\n")
    marked.write_bytes(b"\xef\xbb\xbfa sentence\n")
    for text, out in ((plain, tmp_path / "p.npz"), (marked, tmp_path / "m.npz")):
        code, msg = _calib(
            capsys, model, "-o", out, "--text", text, "--tokenizer", folder, "--seq-len", "4"
        )
        assert code == 0, msg
    assert load_npz(tmp_path / "m.npz")["input_ids"].tolist() == [[2, 3, 0, 0]]
    assert (tmp_path / "m.npz").read_bytes() == (tmp_path / "p.npz").read_bytes()


@pytest.mark.parametrize(
    ("tokenizer", "expected"),
    [
        ("", "--tokenizer: empty path"),  # was ".: tokenizer not found"
        # tok/ exists: a missing file in it, not a hub name ("is not a local path").
        ("tok/vocab.txt", "tok/vocab.txt: tokenizer not found (tok/vocab.txt does not exist)"),
        ("tok/missing", "tok/missing: tokenizer not found (tok/missing does not exist)"),
        ("no/such.json", "no/such.json: tokenizer not found"),
        ("bert-base-uncased", "tokenizer 'bert-base-uncased' is not a local path"),
        ("org/model", "tokenizer 'org/model' is not a local path"),
        # A device is no folder: the message said "no tokenizer.json in the folder".
        ("/dev/null", "/dev/null: not a regular file"),
    ],
)
def test_tokenizer_path_messages(tmp_path, capsys, monkeypatch, tokenizer, expected):
    _tokenizer_folder(tmp_path)
    text = _sentences(tmp_path)
    model = _token_model(tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    code, msg = _calib(
        capsys, model, "-o", tmp_path / "t.npz", "--text", text, "--tokenizer", tokenizer
    )
    assert code == 2, msg
    assert expected in msg, msg
    assert msg.strip().count("\n") == 0, msg


def _embedding_model(path, rows):
    """input_ids [batch, sequence] → Gather from a [rows, 4] table."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((rows, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"])],
        "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_ids_past_the_models_embedding_table_are_refused(tmp_path, capsys):
    """A tokenizer of another model (BERT-base's 30,522 tokens for bert_tiny's 1,000 rows)
    wrote the file, and optimize --calib then failed on ORT's Gather error."""
    folder = _tokenizer_folder(tmp_path)  # ids 0-3; "sentence" is 3
    text = _sentences(tmp_path, "a sentence\n")
    out = tmp_path / "t.npz"
    small = _embedding_model(tmp_path / "e3.onnx", rows=3)
    code, msg = _calib(capsys, small, "-o", out, "--text", text, "--tokenizer", folder)
    assert code == 2 and "values up to 3, but the model's table for it has 3 rows" in msg, msg
    assert len(msg.strip().splitlines()) == 1 and not out.exists()
    fits = _embedding_model(tmp_path / "e4.onnx", rows=4)
    code, msg = _calib(capsys, fits, "-o", out, "--text", text, "--tokenizer", folder)
    assert code == 0, msg
    assert load_npz(out)["input_ids"].max() == 3
