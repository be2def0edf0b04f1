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

Libraries the user names for a run (``--custom-ops``, ``OptimizeOptions.custom_ops``) are
made active with :func:`using_custom_ops`; every ORT session graphopt creates meanwhile
(``graphopt.verify.make_session``) registers them, so a model with custom ops can be
verified, probed and measured like any other.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

from graphopt.errors import UserInputError

LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")
if sys.platform == "win32":
    LIBRARY_NAME = "graphopt_kernels.dll"
elif sys.platform == "darwin":
    LIBRARY_NAME = "libgraphopt_kernels.dylib"
else:
    LIBRARY_NAME = "libgraphopt_kernels.so"

# The user's libraries for the run in progress. A context variable, not an argument threaded
# through every caller: passes build ORT sessions too (attention-mask probes, pruning
# statistics and fidelity, the zero-invariance check), and a model with a custom op loads in
# none of them without its library. Context-local, so concurrent runs in other threads or
# tasks keep their own (a new thread starts with none).
_ACTIVE: ContextVar[tuple[Path, ...]] = ContextVar("graphopt_custom_op_libraries", default=())


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


def resolve_libraries(paths: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """The user's explicit libraries, each checked like :func:`resolve_custom_op_library`.

    Duplicates (after resolving links) are dropped: ORT would register the same ops twice and
    refuse the session. A bad path is a one-line :class:`UserInputError`.
    """
    libraries: list[Path] = []
    for path in paths:
        if os.fspath(path) == "":  # Path("") would silently mean the current directory
            raise UserInputError("custom-op library: empty path")
        library = _explicit(Path(os.fspath(path)))
        if library not in libraries:
            libraries.append(library)
    return tuple(libraries)


@contextlib.contextmanager
def using_custom_ops(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, ...]]:
    """Make ``paths`` the libraries every ORT session created inside the block registers."""
    token = _ACTIVE.set(resolve_libraries(paths))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active_custom_ops() -> tuple[Path, ...]:
    """The libraries made active by the innermost :func:`using_custom_ops` (none outside)."""
    return _ACTIVE.get()


def register_active_custom_ops(
    session_options, libraries: Sequence[str | os.PathLike] | None = None
) -> list[Path]:
    """Register ``libraries`` (default: the active ones) on an ``onnxruntime.SessionOptions``.

    Only explicit libraries: graphopt's own build is not added here (its kernels come later).
    """
    chosen = active_custom_ops() if libraries is None else libraries
    registered = []
    for library in chosen:
        loaded = register_custom_ops(session_options, library)
        if loaded is not None:
            registered.append(loaded)
    return registered


def check_registrable(libraries: Sequence[str | os.PathLike]) -> None:
    """Register each library once on a scratch ``SessionOptions``: refuse bad ones up front.

    Sessions are built deep inside verification and passes, where a failure would read as
    "the model cannot run"; a library ORT cannot load is the user's to fix (exit 2).
    """
    if not libraries:
        return
    from graphopt.ortrun import import_onnxruntime  # ORT only when libraries are given

    ort = import_onnxruntime()
    for library in libraries:
        register_custom_ops(ort.SessionOptions(), library)


# Domains whose ops ONNX Runtime implements itself.
BUILTIN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
    }
)


def custom_domains(model) -> list[str]:
    """Domains of the ops in ``model`` (an ``onnx_ir.Model``) that neither ONNX Runtime nor
    the model's own functions define: what a custom-op library would have to provide."""
    import onnx_ir as ir

    functions = set(model.functions)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(function)
    return sorted(
        {
            node.domain
            for node in nodes
            if node.domain not in BUILTIN_DOMAINS
            and (node.domain, node.op_type, node.overload) not in functions
        }
    )


def missing_library_hint(model) -> str:
    """``; the model uses ops of domain X: pass ... --custom-ops LIB.so`` when that may be why
    ORT cannot load ``model`` (it has custom ops and no library is active), else ``""``."""
    domains = custom_domains(model)
    if not domains or active_custom_ops():
        return ""
    return (
        f"; the model uses ops of domain {', '.join(domains)}: pass the custom-op library "
        "that implements them with --custom-ops LIB.so (API: OptimizeOptions.custom_ops)"
    )
