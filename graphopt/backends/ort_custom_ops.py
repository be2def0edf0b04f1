"""Where ONNX Runtime custom-op libraries may come from (policy only; kernels come later).

Registering a custom-op library loads a shared object into the process: it runs native code
with the user's rights. So graphopt loads one from exactly two places:

- **graphopt's own build location**: ``_build/`` inside the installed ``graphopt.kernels``
  package (``graphopt/kernels/_build/`` in a checkout), under the platform's name
  (:data:`LIBRARY_NAME`). The library is used only when it is a regular file that resolves
  inside that folder (a symlink pointing elsewhere is refused). There is deliberately no
  environment variable: an inherited variable would load a library the user never named.
- **a path the user passes explicitly** (a CLI flag or an API argument): it is resolved
  (symlinks followed), must exist, must be a regular file and must end in ``.so``,
  ``.dylib`` or ``.dll``.

Never from a model file (metadata, custom domains or anything else in it) and never from the
current directory implicitly: a relative path is used only when the user typed it.
:func:`register_custom_ops` is the only place graphopt calls
``SessionOptions.register_custom_ops_library``
(``tests/graphopt_tests/test_safe_loading.py`` checks that).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from graphopt.errors import UserInputError

LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")
if sys.platform == "win32":
    LIBRARY_NAME = "graphopt_kernels.dll"
elif sys.platform == "darwin":
    LIBRARY_NAME = "libgraphopt_kernels.dylib"
else:
    LIBRARY_NAME = "libgraphopt_kernels.so"


def build_dir() -> Path:
    """graphopt's own build location for custom-op libraries (may not exist)."""
    import graphopt.kernels

    return Path(graphopt.kernels.__file__).resolve().parent / "_build"


def resolve_custom_op_library(path: str | os.PathLike | None) -> Path | None:
    """The library to register: ``path`` when given (checked), else graphopt's own build, or None.

    An explicit ``path`` that is missing, not a regular file or not a shared library is a
    :class:`UserInputError`. Without one, the own build is returned only when present and
    safe; otherwise None (no custom ops).
    """
    if path is not None:
        return _explicit(Path(os.fspath(path)))
    folder = build_dir()
    candidate = folder / LIBRARY_NAME
    if not candidate.is_file():
        return None
    resolved = candidate.resolve()
    # A link in the build folder must not turn "our own build" into an arbitrary library.
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        return None
    return resolved


def _explicit(path: Path) -> Path:
    if str(path) == "":
        raise UserInputError("custom-op library: empty path")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise UserInputError(f"{path}: custom-op library not found") from None
    if not resolved.is_file():
        raise UserInputError(f"{path}: custom-op library is not a regular file")
    if resolved.suffix.lower() not in LIBRARY_SUFFIXES:
        raise UserInputError(
            f"{path}: custom-op library must be a {', '.join(LIBRARY_SUFFIXES)} file "
            f"(resolves to {resolved.name})"
        )
    return resolved


def register_custom_ops(session_options, path: str | os.PathLike | None = None) -> Path | None:
    """Register the library :func:`resolve_custom_op_library` allows; return it (or None).

    ``session_options`` is an ``onnxruntime.SessionOptions``. A library ONNX Runtime cannot
    load (not a custom-op library, wrong architecture) is a one-line :class:`UserInputError`.
    """
    library = resolve_custom_op_library(path)
    if library is None:
        return None
    try:
        session_options.register_custom_ops_library(os.fspath(library))
    except Exception as exc:  # ORT raises its own Fail/RuntimeError types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{library}: cannot register custom-op library ({first})") from None
    return library
