"""Deferred imports of heavy modules that dependencies import but a run rarely uses.

onnx-ir imports sympy at module level (for symbolic-dim arithmetic, which an optimize run
on a model with static or plain named dims never does): ~0.25-0.5 s of every command's
start-up. onnxscript's constant folder imports onnx's reference evaluator (~0.1 s), which
it only calls when it actually evaluates a node.

``defer(name)`` puts a placeholder module in ``sys.modules`` that carries the real spec
(``__spec__``, ``__path__``, ``__file__``), so ``import name`` and ``from pkg import name``
succeed without running the module. The first read of any attribute it does not have yet
runs the real module code inside the placeholder object itself (as the standard
``importlib.util.LazyLoader`` does), so every reference taken earlier sees the full module.
``LazyLoader`` itself cannot be used here: ``import x`` reads ``x.__spec__`` when ``x`` is
already in ``sys.modules``, and a LazyLoader module loads on that read.
"""

from __future__ import annotations

import importlib._bootstrap
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Sequence

# Names of the deferred modules whose code a thread is running now; read and changed only
# under the module's import lock (each name by the one thread that holds it).
_executing: set[str] = set()


# The import system's own per-module lock (private in importlib._bootstrap, present in
# CPython 3.11-3.13): a deferred module's code then runs under the lock an ordinary import of
# it takes, with its deadlock detection. Without it, one process-wide reentrant lock.
_MANAGER = getattr(importlib._bootstrap, "_ModuleLockManager", None)
_DEADLOCK = getattr(importlib._bootstrap, "_DeadlockError", RuntimeError)
_FALLBACK_LOCK = threading.RLock()


def _module_lock(name: str):
    return _MANAGER(name) if _MANAGER is not None else _FALLBACK_LOCK


class _DeferredModule(types.ModuleType):
    """A module whose code runs on the first read of an attribute it does not have.

    The code runs under the import system's own lock for the module, with ``__spec__``
    marked as initialising, so another thread that reads an attribute (or imports the module)
    meanwhile waits until the module has run whole rather than seeing it half run; the module
    counts as loaded (a plain module) only then.
    """

    def __getattr__(self, attr: str):
        # Only reached for attributes missing from the module's dict, i.e. before loading
        # (the spec attributes are set) or for a name the real module lacks too.
        if type(self) is _DeferredModule:
            _load(self)
        if type(self) is _DeferredModule:  # its own code (or a deadlocked import) reading it
            raise AttributeError(
                f"partially initialized module {self.__name__!r} has no attribute {attr!r}",
                name=attr,
                obj=self,
            )
        return getattr(self, attr)  # a plain module now (its own __getattr__ included)


def _load(module: _DeferredModule) -> None:
    """Run ``module``'s code in it, once, whichever threads ask at the same time."""
    spec = module.__spec__
    try:
        lock = _module_lock(spec.name)
        lock.__enter__()
    except _DEADLOCK:
        # Two threads each importing what the other one's module needs: as the import
        # system does, this one goes on with the module as it is (not run yet).
        return
    try:
        if type(module) is not _DeferredModule or spec.name in _executing:
            # Loaded while this thread waited, or its own code reading a name it does not
            # define (yet): the module as it is, like any module being run.
            return
        _executing.add(spec.name)
        spec._initializing = True  # as the import system marks a module being run
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)  # the next import retries from scratch
            module.__class__ = types.ModuleType  # a failed load is not retried in this object
            raise
        finally:
            spec._initializing = False
            _executing.discard(spec.name)
        module.__class__ = types.ModuleType
    finally:
        lock.__exit__(None, None, None)


def defer(name: str, search_path: Sequence[str] | None = None) -> bool:
    """Defer running module ``name`` until an attribute of it is read; True if deferred.

    ``search_path`` is the parent package's ``__path__`` for a submodule (given so that
    finding the submodule does not import its parent). Does nothing if the module is
    already imported or cannot be found.
    """
    if name in sys.modules:
        return False
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, search_path)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules[name] = module
    return True


def is_loaded(name: str) -> bool:
    """True when ``name`` was imported and its code has run (not merely deferred)."""
    module = sys.modules.get(name)
    return module is not None and type(module) is not _DeferredModule


def package_path(name: str) -> list[str] | None:
    """``__path__`` of a top-level package, found without importing it."""
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return None
    return list(spec.submodule_search_locations)


def defer_heavy_imports() -> None:
    """Defer sympy (pulled in by onnx-ir); called before onnx-ir is first imported."""
    if "onnx_ir" in sys.modules:
        return  # too late: onnx-ir already ran sympy's import
    ir_path = package_path("onnx_ir")
    # onnx_ir._symbolic_shapes builds a table of sympy functions when it runs, so it is
    # deferred with sympy; onnx_ir._core only uses sympy inside functions.
    if ir_path is not None and defer("sympy"):
        defer("onnx_ir._symbolic_shapes", ir_path)


def defer_onnx_reference() -> None:
    """Defer onnx's reference evaluator, imported by onnxscript's constant folder.

    The folder calls it only to evaluate a node that its own evaluators do not handle;
    a run with nothing of that kind to fold never needs it.
    """
    import onnx

    if "onnx.reference" in sys.modules or not defer("onnx.reference", onnx.__path__):
        return
    reference = sys.modules["onnx.reference"]
    # `import onnx.reference.ops` binds `onnx` and reads the attributes below; the import
    # system sets them only when it runs a submodule itself.
    onnx.reference = reference
    if defer("onnx.reference.ops", reference.__path__):
        reference.ops = sys.modules["onnx.reference.ops"]
