"""The files a run reads and writes: where the output goes, and no written file replacing one
the run reads (the input, its weights, data the options name) or another written file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from graphopt import io
from graphopt.errors import UserInputError
from graphopt.option_checks import is_path, validate_options

if TYPE_CHECKING:
    from graphopt.api import OptimizeOptions

# Pass options whose value names a file the pass reads, unless it is one of these words; by
# option name (the core knows passes only through the registry), as finalize records them.
_FILE_OPTIONS = {
    "calib": ("--calib file", ("", "random")),
    "decisions": ("--sparse-kernels-decisions file", ("",)),
    "speed_check": ("--factorize-speed-check file", ("on", "off")),
}

Files = Iterable[tuple[str, str | os.PathLike]]


def resolve_output(
    source: io.ModelSource, output: str | os.PathLike | None, in_place: bool
) -> Path | None:
    """The file the run writes (None: it only returns the model): the input with
    ``in_place``, else ``output``, which must not be the input."""
    source_path = Path(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else None
    if in_place:
        if source_path is None:
            raise UserInputError("--in-place needs a model file as input")
        if output is not None:
            raise UserInputError("--in-place and -o/--output are mutually exclusive")
        return source_path
    if output is None:
        return None
    target = Path(os.fspath(output))
    if source_path is not None and io.same_file(source_path, target):
        raise UserInputError(
            f"{target}: output would overwrite the input; use --in-place to replace it"
        )
    return target


def check_overwrites(
    source: io.ModelSource,
    output: str | os.PathLike | None,
    options: OptimizeOptions,
    *,
    in_place: bool = False,
    data_files: Iterable[Path] | None = None,
    also_read: Files = (),
    also_written: Files = (),
) -> None:
    """Refuse a file the run writes that is a file it reads, or that it writes twice.

    Read: the input model and its external data (``data_files``; None: from the model file's
    header), the recipe, calibration and verification data, custom-op libraries and the
    files pass options replay (``_FILE_OPTIONS``). Written: the output and its data file,
    the engine, ``--save-ort-optimized``. Each written file would replace a read one only
    after the run read it, so nothing fails, and the user's file is gone: refused in one
    line, before any work. ``also_read``/``also_written``: (what, path) the caller adds
    (the CLI's --recipe and --save-ort-optimized). Compared as io.same_file does (the same
    inode when both exist, links included; else the resolved path).
    """
    options = validate_options(options)
    target = resolve_output(source, output, in_place)
    model: list[tuple[str, Path]] = []
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        model.append(("the input model", path))
        if data_files is None:
            data_files = _scanned_data_files(path)
    model += [("the input's external-data file", Path(f)) for f in data_files or ()]
    read = [*_read_files(options), *((what, Path(os.fspath(p))) for what, p in also_read)]
    # (who writes, what the file is to the other writers, where)
    written: list[tuple[str, str, Path]] = []
    if target is not None:
        data = target.with_name(io.data_file_name(target))
        written += [
            ("the output", "the output", target),
            ("the output's data file", "the output's data file", data),
        ]
    flags = [("--engine", options.engine.path)] if options.engine is not None else []
    for flag, path in [*flags, *also_written]:
        if is_path(path):
            written.append((flag, f"the {flag} file", Path(os.fspath(path))))
    for index, (writer, _, path) in enumerate(written):
        others = read + [(what, other) for _, what, other in written[:index]]
        # --in-place replaces the model and its weights: what it is for. The engine against
        # the model, its weights and the output: tensorrt.build.check_options, in its words.
        if writer == "--engine":
            others = read
        elif not (in_place and writer in ("the output", "the output's data file")):
            others += model
        for what, other in others:
            if io.same_file(path, other):
                raise UserInputError(
                    f"{writer} {path}: is {what}; give another path (the run would overwrite it)"
                )


def _read_files(options: OptimizeOptions) -> list[tuple[str, Path]]:
    """The data files ``options`` name: verification inputs, libraries, pass options' files."""
    files = []
    if is_path(options.verify_inputs):
        files.append(("the --verify-inputs file", options.verify_inputs))
    files += [("the --custom-ops library", library) for library in options.custom_ops]
    for spec in [*(options.passes or []), *options.lossy_specs()]:
        for option, value in spec.options.items():
            what, words = _FILE_OPTIONS.get(option, ("", ()))
            if what and is_path(value) and os.fspath(value).strip().lower() not in words:
                files.append((f"the {what}", value))
    return [(what, Path(os.fspath(path))) for what, path in files]


def _scanned_data_files(path: Path) -> list[Path]:
    """The external-data files the model file at ``path`` names, from its header (a scan, not
    a load: the CLI checks before the model is loaded; the API checks again after)."""
    from graphopt.backends.tensorrt.model_scan import scan_model

    header = scan_model(path)
    # A location with a NUL byte is no path (os.stat raises ValueError): the loader refuses
    # it in one line, after this check.
    locations = sorted(header.locations if header else ())
    return [path.parent / location for location in locations if "\0" not in location]
