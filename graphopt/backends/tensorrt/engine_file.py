"""Where ``--engine`` writes: checked before any work, written atomically.

The engine path must name a regular file (or nothing yet) in an existing, writable folder; a
symbolic link is refused, not followed (a link planted in a shared folder would redirect the
write). It must not be the input model, the ONNX output, or a file either of them reads its
weights from, whatever the spelling (a symbolic or hard link to one counts as that file).

The plan is written by :func:`graphopt.io.write_file_atomically`, as models are saved: an
interrupted write leaves the previous plan or none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from graphopt import io
from graphopt.backends.tensorrt.model_scan import scan_model
from graphopt.errors import UserInputError

Protected = Iterable[tuple[str | os.PathLike, str]]


def engine_target(path: str | os.PathLike) -> Path:
    """``--engine``'s path, refused when it cannot name a file."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise UserInputError("--engine: empty path; give the engine's file, e.g. model.plan")
    if text.endswith((os.sep, os.altsep or os.sep)):
        raise UserInputError(f"--engine {text}: names a folder; give the engine's file")
    return Path(text)


def protected_files(
    input_path: str | os.PathLike | None, output_path: str | os.PathLike | None
) -> list[tuple[Path, str]]:
    """The files the engine must not replace, each with what it is."""
    files: list[tuple[Path, str]] = []
    if input_path is not None:
        source = Path(os.fspath(input_path))
        files.append((source, "the input model"))
        header = scan_model(source)
        for location in sorted(header.locations if header else ()):
            files.append((source.parent / location, "an external-data file of the input model"))
    if output_path is not None:
        output = Path(os.fspath(output_path))
        files.append((output, "the ONNX output"))
        files.append((output.with_name(io.data_file_name(output)), "the ONNX output's data file"))
    return files


def check_engine_target(path: str | os.PathLike, protected: Protected) -> Path:
    """Refuse an engine path that cannot be written or would replace a protected file."""
    target = engine_target(path)
    try:
        io.check_output_target(target)
    except UserInputError as exc:
        raise UserInputError(f"--engine {exc}") from None
    for other, what in protected:
        if io.same_file(target, Path(os.fspath(other))):
            raise UserInputError(
                f"--engine {target}: is {what}; the engine would overwrite it (give another path)"
            )
    return target


def write_engine(path: str | os.PathLike, data: memoryview | bytes, protected: Protected) -> Path:
    """Write ``data`` to ``path`` atomically, after checking the path again (the pipeline ran
    in between: the folder or the file may have changed)."""
    target = check_engine_target(path, protected)
    try:
        return io.write_file_atomically(target, lambda handle: handle.write(data))
    except UserInputError as exc:
        raise UserInputError(f"--engine {exc}") from None
