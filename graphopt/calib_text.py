"""Calibration arrays for a text model's token inputs, from a file of one sentence per line.

The tokenizer is a local ``tokenizer.json`` (a file, or a folder holding one: what
Hugging Face checkpoints ship), read with the ``tokenizers`` library. Nothing is downloaded:
a tokenizer *name* that is not a local path is refused. Every sentence is encoded with its
special tokens, truncated and padded to the sequence length (the model's fixed one, else
``--seq-len``, default 128), as graphopt's ``.npz`` convention wants: ``[N, seq_len]``
arrays with their attention masks, padding on the right.

Which array goes to which model input is read from the input names: ``input_ids`` (or
``ids``), a name with ``mask`` (attention mask), a name with ``token_type`` or ``segment``
(token types). A model input none of them fits is an error: calib cannot make it up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.input_dims import graph_inputs

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from graphopt.calib_builder import CalibRequest

DEFAULT_SEQ_LEN = 128
TOKENIZER_FILE = "tokenizer.json"
_INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# Pad tokens of the common vocabularies, for a tokenizer.json without a padding setting.
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


def input_role(name: str) -> str | None:
    """Which token array a model input named ``name`` takes: "ids", "mask", "types" or None."""
    lowered = name.lower()
    if "mask" in lowered:
        return "mask"
    if "token_type" in lowered or "segment" in lowered:
        return "types"
    if lowered in ("ids", "input_ids", "input") or lowered.endswith("input_ids"):
        return "ids"
    return None


def text_arrays(model: ir.Model, request: CalibRequest) -> dict[str, np.ndarray]:
    """``{input name: int [N, seq_len]}`` for every model input, from ``request.text``."""
    from graphopt.calib_builder import pick

    roles = _roles(model)
    seq_len = _sequence_length(model, request.seq_len)
    if request.tokenizer is None:
        raise UserInputError("--text needs --tokenizer PATH (a tokenizer.json or its folder)")
    tokenizer = load_tokenizer(request.tokenizer)
    lines = pick(read_sentences(Path(os.fspath(request.text))), request.limit, request.seed)
    tokenizer.enable_truncation(max_length=seq_len)
    pad_id, pad_token = _pad(tokenizer)
    tokenizer.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token)
    encodings = tokenizer.encode_batch(lines)
    longest = max(len(e.ids) for e in encodings)
    if longest > seq_len:
        # Truncation keeps the special tokens ([CLS] ... [SEP]) whatever max_length says.
        raise UserInputError(
            f"--seq-len {seq_len}: too short for the tokenizer's special tokens "
            f"(a sentence still takes {longest} tokens)"
        )
    columns = {
        "ids": [e.ids for e in encodings],
        "mask": [e.attention_mask for e in encodings],
        "types": [e.type_ids for e in encodings],
    }
    return {
        value.name: np.asarray(columns[role], dtype=value.dtype.numpy()) for value, role in roles
    }


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (or a folder holding one)."""
    from tokenizers import Tokenizer

    given = Path(os.fspath(path))
    if not given.exists():
        if not given.is_absolute() and len(given.parts) <= 2 and given.suffix != ".json":
            # "bert-base-uncased", "org/model": a hub name, which calib never downloads.
            raise UserInputError(
                f"tokenizer {str(path)!r} is not a local path; graphopt does not download "
                f"tokenizers: give a {TOKENIZER_FILE} file or a folder holding one"
            )
        raise UserInputError(f"{given}: tokenizer not found (no such file or folder)")
    file = given / TOKENIZER_FILE if given.is_dir() else given
    if not file.is_file():
        raise UserInputError(f"{given}: tokenizer not found (no {TOKENIZER_FILE} in the folder)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises plain Exceptions for a malformed file
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"{file}: cannot load tokenizer ({message})") from None


def read_sentences(path: Path) -> list[str]:
    """The non-empty lines of ``path``, stripped, in file order."""
    if path.exists() and not path.is_dir() and not path.is_file():
        # A device or FIFO (/dev/zero) would be read until memory runs out.
        raise UserInputError(f"{path}: not a regular file; --text takes a file of sentences")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such text file") from None
    except IsADirectoryError:
        raise UserInputError(f"{path}: is a folder; --text takes a file of sentences") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserInputError(f"{path}: no sentences (the file has no non-empty line)")
    return lines


def _roles(model: ir.Model) -> list[tuple[ir.Value, str]]:
    inputs = graph_inputs(model)
    roles = [(value, input_role(value.name)) for value in inputs]
    unmapped = [value.name for value, role in roles if role is None]
    if unmapped:
        raise UserInputError(
            f"model input(s) {', '.join(map(repr, unmapped))} are not token inputs --text can "
            "fill (input_ids, attention_mask, token_type_ids)"
        )
    if not any(role == "ids" for _, role in roles):
        raise UserInputError("model has no input_ids input; --text fills token inputs")
    for value, _ in roles:
        if value.dtype not in _INTEGER_TYPES or value.shape is None or len(value.shape) != 2:
            raise UserInputError(
                f"input {value.name!r} is not an int64/int32 [batch, sequence] tensor; "
                "--text fills token inputs"
            )
    return roles  # type: ignore[return-value]


def _sequence_length(model: ir.Model, asked: int | None) -> int:
    """The model's fixed sequence length, else ``asked``, else the default."""
    fixed = {
        value.shape[1]
        for value in graph_inputs(model)
        if value.shape is not None
        and len(value.shape) == 2
        and isinstance(value.shape[1], int)
        and value.shape[1] > 0
    }
    if asked is not None and asked < 1:
        raise UserInputError(f"--seq-len {asked}: expected a positive number of tokens")
    if len(fixed) > 1:
        raise UserInputError(f"model inputs disagree on the sequence length ({sorted(fixed)})")
    if fixed:
        (length,) = fixed
        if asked is not None and asked != length:
            raise UserInputError(f"--seq-len {asked}: the model's inputs are fixed at {length}")
        return length
    return asked or DEFAULT_SEQ_LEN


def _pad(tokenizer: Tokenizer) -> tuple[int, str]:
    """The pad id and token: the tokenizer's own padding setting, else a known pad token."""
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"]), str(padding["pad_token"])
    for token in _PAD_TOKENS:
        index = tokenizer.token_to_id(token)
        if index is not None:
            return index, token
    return 0, "[PAD]"
