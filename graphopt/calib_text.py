"""Calibration arrays for a text model's token inputs, from a file of one sentence per line.

The tokenizer is a local ``tokenizer.json`` (a file, or a folder holding one: what
Hugging Face checkpoints ship), read with the ``tokenizers`` library. Nothing is downloaded:
a tokenizer *name* that is not a local path is refused. Every sentence is encoded with its
special tokens, truncated and padded to the sequence length (the model's fixed one, else
``--seq-len``, default 128), as graphopt's ``.npz`` convention wants: ``[N, seq_len]``
arrays with their attention masks, padding on the right.

Which array goes to which model input is read from the input names: ``input_ids`` (or
``ids``), a name with ``mask`` (attention mask), a name with ``token_type`` or ``segment``
(token types). A model input none of them fits is an error: calib cannot make it up. So is
a batch the model fixes above 1: calib writes one row per sentence (as for images).

The text file is UTF-8 (a byte-order mark is skipped); lines end at ``\n``, ``\r\n`` or
``\r`` only, not at the other characters ``str.splitlines`` breaks on (form feed, U+2028,
...), which can sit inside a sentence.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError, is_rust_panic
from graphopt.input_dims import graph_inputs, index_bound

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from graphopt.calib_builder import CalibRequest

DEFAULT_SEQ_LEN = 128
TOKENIZER_FILE = "tokenizer.json"
_INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# Pad tokens of the common vocabularies, for a tokenizer.json without a padding setting.
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")
# What a hub id looks like ("bert-base-uncased", "org/model"), unlike a mistyped local path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = frozenset({".json", ".txt", ".model", ".vocab"})
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_T = TypeVar("_T")


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


def text_arrays(
    model: ir.Model, request: CalibRequest, tokenizer_path: Path | None = None
) -> dict[str, np.ndarray]:
    """``{input name: int [N, seq_len]}`` for every model input, from ``request.text``
    (``tokenizer_path``: :func:`tokenizer_file` of ``request.tokenizer``, if known)."""
    from graphopt.calib_builder import pick

    roles = _roles(model)
    _check_batch(roles)
    seq_len = _sequence_length(model, request.seq_len)
    if tokenizer_path is None:
        if request.tokenizer is None:
            raise UserInputError("--text needs --tokenizer PATH (a tokenizer.json or its folder)")
        tokenizer_path = tokenizer_file(request.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    lines = pick(read_sentences(Path(os.fspath(request.text))), request.limit, request.seed)

    def encode() -> list:
        tokenizer.enable_truncation(max_length=seq_len)
        pad_id, pad_token = _pad(tokenizer)
        tokenizer.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token)
        return tokenizer.encode_batch(lines)

    encodings = _tokenizer_call(tokenizer_path, "cannot encode the text", encode)
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
    arrays = {
        value.name: np.asarray(columns[role], dtype=value.dtype.numpy()) for value, role in roles
    }
    for value, _ in roles:
        _check_in_table(value, arrays[value.name], tokenizer_path)
    return arrays


def _check_in_table(value: ir.Value, ids: np.ndarray, tokenizer_path: Path) -> None:
    """Refuse ids past the table the input indexes (a tokenizer of another model: BERT-base's
    30,522 tokens for a 1,000-row embedding), here rather than as ONNX Runtime's Gather error
    when the file is used."""
    rows = index_bound(value)
    if rows is None or ids.size == 0:
        return
    largest = int(ids.max())
    if largest >= rows:
        raise UserInputError(
            f"{tokenizer_path}: gives {value.name!r} values up to {largest}, but the model's "
            f"table for it has {rows} rows: is this the model's own tokenizer?"
        )


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` that ``--tokenizer path`` names: the file, or the one in the
    folder. Not read here (the caller checks first that -o is not this file)."""
    text = os.fspath(path)
    if not str(text).strip():
        raise UserInputError(
            f"--tokenizer: empty path; give a {TOKENIZER_FILE} file or a folder holding one"
        )
    given = Path(text)
    if not given.exists():
        if _looks_like_hub_name(str(text)):
            # "bert-base-uncased", "org/model": a hub name, which calib never downloads.
            raise UserInputError(
                f"tokenizer {str(text)!r} is not a local path; graphopt does not download "
                f"tokenizers: give a {TOKENIZER_FILE} file or a folder holding one"
            )
        raise UserInputError(f"{given}: tokenizer not found ({given} does not exist)")
    if not given.is_dir():
        if not given.is_file():  # a device, a FIFO
            raise UserInputError(
                f"{given}: not a regular file; give a {TOKENIZER_FILE} file or a folder holding one"
            )
        return given
    file = given / TOKENIZER_FILE
    if not file.is_file():
        raise UserInputError(f"{given}: tokenizer not found (no {TOKENIZER_FILE} in the folder)")
    return file


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (or a folder holding one)."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    return _tokenizer_call(file, "cannot load tokenizer", lambda: Tokenizer.from_file(str(file)))


def _looks_like_hub_name(text: str) -> bool:
    """Whether a missing ``--tokenizer`` path reads as a hub id rather than a mistyped local
    path: one or two plain name parts, no file suffix, and no existing folder as its first
    part ("tok/vocab.txt" with a tok/ folder is a local file that is missing)."""
    path = Path(text)
    if not _HUB_NAME.fullmatch(text) or path.suffix.lower() in _FILE_SUFFIXES:
        return False
    return not (len(path.parts) == 2 and path.parent.is_dir())


def _tokenizer_call(file: Path, what: str, call: Callable[[], _T]) -> _T:
    """``call()``, with the tokenizer's failures as one-line errors naming ``file``.

    The library raises plain Exceptions for a malformed or inconsistent tokenizer (a
    WordLevel vocabulary without its unknown token fails only when encoding), and a Rust
    panic (a broken Precompiled normalizer) as pyo3's PanicException, a BaseException,
    after Rust's panic hook wrote the panic and a backtrace to file descriptor 2: that is
    captured while the call runs, dropped on a panic and passed on otherwise.
    """
    panicked = False
    captured = bytearray()
    try:
        with _stderr_captured() as captured:
            try:
                return call()
            except Exception as exc:
                raise UserInputError(f"{file}: {what} ({_first_line(exc)})") from None
            except BaseException as exc:
                if not is_rust_panic(exc):
                    raise
                panicked = True
                raise UserInputError(
                    f"{file}: {what}: the tokenizers library crashed ({_first_line(exc)}); "
                    "the tokenizer file is likely malformed"
                ) from None
    finally:
        if not panicked and captured:
            with contextlib.suppress(OSError):
                sys.stderr.flush()
                os.write(2, captured)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[bytearray]:
    """File descriptor 2 redirected to a temporary file while the block runs; yields a
    bytearray that holds what was written there once the block ends."""
    captured = bytearray()
    with contextlib.ExitStack() as stack:
        saved: int | None = None
        try:
            sys.stderr.flush()
            sink = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except (OSError, ValueError):  # no temporary file, no descriptor 2: nothing captured
            pass
        if saved is None:
            yield captured
            return
        stack.callback(os.close, saved)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            sink.seek(0)
            captured.extend(sink.read())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_sentences(path: Path) -> list[str]:
    """The non-empty lines of ``path``, stripped, in file order."""
    if path.exists() and not path.is_dir() and not path.is_file():
        # A device or FIFO (/dev/zero) would be read until memory runs out.
        raise UserInputError(f"{path}: not a regular file; --text takes a file of sentences")
    try:
        # utf-8-sig: a byte-order mark (Notepad writes one) is no part of the first sentence.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such text file") from None
    except IsADirectoryError:
        raise UserInputError(f"{path}: is a folder; --text takes a file of sentences") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None
    lines = [line.strip() for line in _LINE_BREAK.split(text) if line.strip()]
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


def _check_batch(roles: list[tuple[ir.Value, str]]) -> None:
    """Refuse a batch the model fixes above 1, as calib_images does: the file holds one row
    per sentence, which --calib then feeds in batches the model would not take."""
    for value, _ in roles:
        batch = value.shape[0]
        if isinstance(batch, int) and batch > 1:
            raise UserInputError(
                f"input {value.name!r} has a fixed batch of {batch}; calib writes one sample "
                "per sentence and needs a batch dim that is 1 or symbolic"
            )


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
