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

One fallback for the first: when the installed package folder is read-only (a system-wide
install), ``python -m graphopt.kernels build`` builds into a per-user cache folder instead,
:func:`user_build_dir`: ``~/.cache/graphopt/kernels/build-<digest>/``, where ``~`` is the
account's home from the password database (not ``$HOME``/``$XDG_CACHE_HOME``: no environment
variable picks a library) and ``<digest>`` hashes the package's kernel sources, so a build of
other sources is never loaded. It is trusted only while the package folder is read-only, and
only when the library and every folder from ``~/.cache/graphopt`` down to it belong to the
current user and are writable by nobody else.

A model of graphopt's op domain needs graphopt's own library (:func:`own_library`): its
build above, else an explicit library of the run that provides those ops (a build of another
checkout given with ``--custom-ops``; checked by running one op, :func:`provides_own_ops`).

Never from a model file (metadata, custom domains or anything else in it) and never from the
current directory implicitly: a relative path is used only when the user typed it.
:func:`register_custom_ops` is the only place graphopt calls
``SessionOptions.register_custom_ops_library``
(``tests/graphopt_tests/test_safe_loading.py`` checks that).

Libraries the user names for a run (``--custom-ops``, ``OptimizeOptions.custom_ops``) are
made active with :func:`using_custom_ops`; every ORT session graphopt creates meanwhile
(``graphopt.sessions.make_session``) registers them, so a model with custom ops can be
verified, probed and measured like any other.
"""

from __future__ import annotations

import contextlib
import functools
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
    own = _library_in(folder)
    if own is not None or package_build_writable():
        return own
    cache = user_build_dir()
    if cache is None:
        return None
    library = _library_in(cache)
    if library is None or not _private_to_user(library, cache.parents[1]):
        return None
    return library


def _library_in(folder: Path) -> Path | None:
    candidate = folder / LIBRARY_NAME
    if not candidate.is_file():
        return None
    resolved = candidate.resolve()
    # A link in the build folder must not turn "our own build" into an arbitrary library.
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        return None
    return resolved


def package_build_writable() -> bool:
    """Whether :func:`build_dir` can be written (created, when missing) by this user."""
    folder = build_dir()
    return os.access(folder if folder.exists() else folder.parent, os.W_OK)


def kernel_source_digest() -> str:
    """16 hex digits hashing graphopt/kernels' C++ sources and CMakeLists.txt."""
    import hashlib

    import graphopt.kernels

    root = Path(graphopt.kernels.__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted([root / "CMakeLists.txt", *(root / "src").glob("*")]):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def user_build_dir() -> Path | None:
    """The per-user build folder for a read-only installation (POSIX only), else None."""
    if os.name != "posix":
        return None
    import pwd

    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    return home / ".cache" / "graphopt" / "kernels" / f"build-{kernel_source_digest()}"


def _private_to_user(library: Path, top: Path) -> bool:
    """``library`` and its folders up to ``top`` are the user's and writable by no one else
    (another account that could swap the file would choose the code graphopt loads)."""
    paths = [library, *library.parents]
    for path in paths[: paths.index(top) + 1] if top in paths else []:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
    return top in paths


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
    session_options, libraries: Sequence[str | os.PathLike] | None = None, model=None
) -> list[Path]:
    """Register ``libraries`` (default: the active ones) on an ``onnxruntime.SessionOptions``,
    and graphopt's own build when ``model`` uses ops of domain :data:`OWN_DOMAIN` (only then:
    a model never chooses the library, it only names the domain graphopt maps to its own)."""
    chosen = active_custom_ops() if libraries is None else libraries
    own = None
    if model is not None and uses_own_kernels(model):
        check_own_domain_version(model)
        own = own_library()
    registered = []
    for library in chosen:
        if own is not None and _same_contents(Path(os.fspath(library)), own):
            # graphopt's own build, or a copy of it, given with --custom-ops: registered once,
            # below (ORT refuses a domain registered twice: "Domain already set in registry").
            continue
        loaded = register_custom_ops(session_options, library)
        if loaded is not None:
            registered.append(loaded)
    if own is not None:
        registered.append(register_custom_ops(session_options, own))
    return registered


def check_domain_conflict(exc: BaseException) -> None:
    """A one-line user error when ORT refused a session because two custom-op libraries
    register one op domain (a user library and graphopt's own build, an older copy of it,
    both claiming ``graphopt``); nothing otherwise. The user's to fix, not the model's."""
    if "Domain already set in registry" in str(exc):
        raise UserInputError(
            "two custom-op libraries register the same op domain (graphopt's own kernels "
            f"register {OWN_DOMAIN!r}): drop the --custom-ops library that repeats it"
        ) from None


def _same_contents(a: Path, b: Path) -> bool:
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


# The op domain of graphopt's own kernels (graphopt/kernels): a lowered model names only this
# domain and its version, never a library path.
OWN_DOMAIN = "graphopt"
OWN_DOMAIN_VERSION = 1
BUILD_COMMAND = "python -m graphopt.kernels build"


def uses_own_kernels(model) -> bool:
    """Whether ``model`` (an ``onnx_ir.Model`` or ``onnx.ModelProto``) has ops of
    :data:`OWN_DOMAIN` (subgraphs and functions included)."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return OWN_DOMAIN in custom_domains(model)
    import onnx

    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return any(node.domain == OWN_DOMAIN for node in nodes)


def own_domain_version(model) -> int | None:
    """The version of :data:`OWN_DOMAIN` that ``model`` (an ``onnx_ir.Model`` or
    ``onnx.ModelProto``) imports, or None when it imports none."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return model.opset_imports.get(OWN_DOMAIN)
    versions = [entry.version for entry in model.opset_import if entry.domain == OWN_DOMAIN]
    return versions[0] if versions else None


def check_own_domain_version(model) -> None:
    """Refuse (one-line :class:`UserInputError`) a model importing a version of
    :data:`OWN_DOMAIN` other than :data:`OWN_DOMAIN_VERSION`. ONNX Runtime cannot: it gives a
    custom op one schema from its first version on, so version 2 of the domain would run on
    these version-1 kernels as if it were 1, whatever changed in its layouts."""
    version = own_domain_version(model)
    if version is not None and version != OWN_DOMAIN_VERSION:
        raise UserInputError(
            f"the model imports domain {OWN_DOMAIN!r} version {version}; graphopt's sparse "
            f"kernels implement version {OWN_DOMAIN_VERSION} only (lower the model again with "
            "this graphopt, or use the graphopt that wrote it)"
        )


def missing_own_library_message() -> str:
    """One line: the model needs graphopt's kernels, where they would be, how to build them
    (or name a build with --custom-ops), and that the libraries named do not provide them."""
    given = active_custom_ops()
    named = ""
    if given:
        names = ", ".join(str(library) for library in given)
        named = f"; the --custom-ops library given does not provide them ({names})"
    return (
        f"the model uses ops of domain {OWN_DOMAIN!r} (graphopt's sparse kernels), whose "
        f"library is not built: expected at {build_dir() / LIBRARY_NAME} "
        f"(graphopt.kernels.library_path()); build it with `{BUILD_COMMAND}`, or name a "
        f"build of it with --custom-ops{named}"
    )


def own_library() -> Path:
    """graphopt's own kernel library, or a one-line :class:`UserInputError` saying how to
    build it.

    Its own build first; without one, a library the user named for this run
    (``--custom-ops``, :func:`using_custom_ops`) that provides graphopt's ops (a build of
    another checkout or installation): named explicitly, it is the user's choice to load."""
    library = resolve_custom_op_library(None)
    if library is None:
        library = next((lib for lib in active_custom_ops() if provides_own_ops(lib)), None)
    if library is None:
        raise UserInputError(missing_own_library_message())
    return library


def provides_own_ops(library: str | os.PathLike) -> bool:
    """Whether ``library`` (an explicit, already checked path) implements graphopt's ops of
    :data:`OWN_DOMAIN` version :data:`OWN_DOMAIN_VERSION`: an ORT session of one
    ``SparseMatMul`` loads with it and computes ``x @ W``. Remembered per file (path, size,
    modification time)."""
    path = Path(os.fspath(library))
    try:
        info = path.stat()
    except OSError:
        return False
    return _provides_own_ops(str(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _provides_own_ops(path: str, size: int, mtime_ns: int) -> bool:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from graphopt.kernels.packing import pack_bsr
    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()
    w = np.arange(1, 9, dtype=np.float32).reshape(4, 2)
    packed = pack_bsr(w, 1, 4)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(packed.values), "values"),
        numpy_helper.from_array(np.ascontiguousarray(packed.col_idx), "col_idx"),
        numpy_helper.from_array(np.ascontiguousarray(packed.row_ptr), "row_ptr"),
    ]
    node = helper.make_node(
        "SparseMatMul",
        ["x", "values", "col_idx", "row_ptr"],
        ["y"],
        domain=OWN_DOMAIN,
        K=4,
        N=2,
        activation="none",
        block_r=1,
        block_c=4,
    )
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(OWN_DOMAIN, OWN_DOMAIN_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a refusal is the answer, not an error to print
        register_custom_ops(options, path)
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, {"x": x})
    except Exception:  # not a custom-op library (a UserInputError), or none with graphopt's
        return False  # ops (ORT's own error types)
    return bool(np.allclose(y, x @ w))


def own_session_options():
    """An ``onnxruntime.SessionOptions`` with graphopt's own kernels registered: what a plain
    ORT user passes to ``InferenceSession`` to run a ``--sparse-kernels`` model."""
    from graphopt.ortrun import import_onnxruntime

    options = import_onnxruntime().SessionOptions()
    register_custom_ops(options, own_library())
    return options


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
    # graphopt's own domain is never the user's to supply: its ops failing is the error.
    domains = [d for d in custom_domains(model) if d != OWN_DOMAIN]
    if not domains or active_custom_ops():
        return ""
    return (
        f"; the model uses ops of domain {', '.join(domains)}: pass the custom-op library "
        "that implements them with --custom-ops LIB.so (API: OptimizeOptions.custom_ops)"
    )
