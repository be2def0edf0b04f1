"""graphopt used from several threads at once: the first-use loads (the pass registry, deferred
modules), the process-wide BLAS thread limit and the CLI's signal handler.

Each race is forced into its bad interleaving (a paused import, a paused module body, a
non-nested exit) rather than left to luck."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from pathlib import Path

import numpy as np
import pytest


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _waits_in(thread: threading.Thread, function: str, seconds: float) -> bool:
    """True once ``thread`` has stayed inside ``function`` for ``seconds`` (it is blocked
    there); False if it left or ended first."""
    since = None
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        frame = sys._current_frames().get(thread.ident or -1)
        inside = False
        while frame is not None:
            if frame.f_code.co_name == function:
                inside = True
                break
            frame = frame.f_back
        if not inside:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= seconds:
            return True
        time.sleep(0.005)
    return False


def test_registry_read_during_another_threads_first_load_sees_every_pass() -> None:
    """Thread A's first ``all_passes()`` is paused inside ``import graphopt.passes`` (which is
    then in sys.modules already); thread B's ``all_passes()`` meanwhile must wait for the whole
    registry, not return the one pass registered so far."""
    out = run_python(
        "import sys, threading, time\n"
        + inspect.getsource(_waits_in)
        + textwrap.dedent(
            """
        import graphopt.registry as reg

        paused, b_done = threading.Event(), threading.Event()
        counts = {}

        class PauseFirstPassModule:
            def find_spec(self, name, path=None, target=None):
                if name == "graphopt.passes.blocks" and not paused.is_set():
                    paused.set()
                    # Hold A's import until B returned, or B is blocked waiting for A.
                    while not b_done.is_set() and not _waits_in(b, "_load_builtin_passes", 0.3):
                        time.sleep(0.005)
                return None  # the ordinary finders find it

        sys.meta_path.insert(0, PauseFirstPassModule())

        def read(key):
            if key == "B":
                paused.wait(30)
            counts[key] = len(reg.all_passes())
            if key == "B":
                b_done.set()

        a = threading.Thread(target=read, args=("A",))
        b = threading.Thread(target=read, args=("B",))
        b.start(); a.start(); a.join(); b.join()
        print(counts["A"], counts["B"], len(reg.all_passes()))
        """
        )
    )
    a, b, after = map(int, out.split())
    assert a == b == after > 50


@pytest.fixture
def slow_module(tmp_path: Path):
    """A deferred module whose body pauses until the test releases it."""
    name = f"graphopt_test_slow_{uuid.uuid4().hex}"
    sync = types.ModuleType(f"{name}_sync")
    sync.started, sync.release = threading.Event(), threading.Event()
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import {sync.__name__} as sync
            # The module's own code reading a name it lacks: AttributeError, as for any
            # partly run module (not a wait for itself).
            try:
                sys.modules[__name__].VALUE
            except AttributeError:
                SELF_READ = "AttributeError"
            sync.started.set()
            sync.release.wait(30)
            VALUE = 42
            """
        )
    )
    sys.modules[sync.__name__] = sync
    from graphopt import _deferred

    assert _deferred.defer(name, [str(tmp_path)])
    try:
        yield sys.modules[name], sync
    finally:
        sync.release.set()
        sys.modules.pop(name, None)
        sys.modules.pop(sync.__name__, None)


def test_deferred_module_read_while_loading_waits_for_the_whole_module(slow_module) -> None:
    """B reads an attribute while A runs the deferred module's code: B waits and gets it, not
    an AttributeError from the half-run module."""
    from graphopt import _deferred

    module, sync = slow_module
    got: dict[str, object] = {}

    def read(key: str) -> None:
        try:
            got[key] = module.VALUE
        except AttributeError as exc:
            got[key] = exc

    a = threading.Thread(target=read, args=("A",))
    a.start()
    assert sync.started.wait(30)
    b = threading.Thread(target=read, args=("B",))
    b.start()
    _waits_in(b, "__getattr__", 0.2)  # B blocked in the placeholder, or (the bug) done
    loaded_while_running = _deferred.is_loaded(module.__name__)
    sync.release.set()
    a.join(30)
    b.join(30)
    assert got == {"A": 42, "B": 42}
    assert not loaded_while_running  # only a module run whole counts as loaded
    assert module.SELF_READ == "AttributeError"
    assert _deferred.is_loaded(module.__name__)
    with pytest.raises(AttributeError, match="has no attribute 'MISSING'"):
        module.MISSING  # noqa: B018


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_single_threaded_blas_holds_until_the_last_user_leaves() -> None:
    """Two overlapping runs that leave in the order they came (A in, B in, A out, B out): B's
    passes keep one thread after A returns, and the caller's setting comes back at the end."""
    from threadpoolctl import threadpool_limits

    from graphopt.blas_threads import single_threaded_blas

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and all(n == 2 for n in before)
        a, b = single_threaded_blas(), single_threaded_blas()
        a.__enter__()
        b.__enter__()
        assert all(n == 1 for n in _blas_threads())
        a.__exit__(None, None, None)
        assert all(n == 1 for n in _blas_threads())  # B still runs passes
        b.__exit__(None, None, None)
        assert _blas_threads() == before
        with single_threaded_blas(), single_threaded_blas():  # nested: one thread throughout
            assert all(n == 1 for n in _blas_threads())
        assert _blas_threads() == before


def test_cli_main_runs_outside_the_main_thread(capsys: pytest.CaptureFixture[str]) -> None:
    """Signal handlers can only be set from the main thread: main() elsewhere leaves them."""
    import signal

    from graphopt.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    result: list[object] = []

    def go() -> None:
        try:
            result.append(main(["passes"]))
        except BaseException as exc:  # reported by the assertion
            result.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    thread.join(60)
    assert result == [0]
    assert "dead-code" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler
