"""A hostile-input corpus, generated (never committed), and the runner that checks one case.

Categories cover what a model downloaded from anywhere may hold: corrupt protobufs, absurd
versions, unknown domains, cycles, dangling and duplicate names, huge declared dims, unsafe
external data, wrong tensor sizes, subgraphs with outer-scope references, non-ASCII names,
corrupt string fields.
Generation is seeded: the same corpus on every run and machine. The cases live in
``cases_*.py``; importing this module registers them all in ``CASES``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from graphopt_tests.robustness import (  # noqa: F401 (importing registers the cases)
    cases_graphs,
    cases_strings,
    cases_structure,
    cases_tensors,
)
from graphopt_tests.robustness.build import CASES, Case, base_model

__all__ = ["CASES", "Case", "Outcome", "base_model", "categories", "run_case", "run_in_process"]


def categories() -> Counter[str]:
    return Counter(case.category for case in CASES)


# --- running a case ----------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs too long (BaseException: the CLI must not eat it)."""


@dataclass
class Outcome:
    case: Case
    code: int | None
    stderr: str
    seconds: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (links not followed) with its size and mtime."""
    tree: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            st = path.lstat()
            # A folder's mtime changes whenever an entry is added: compare its entries instead.
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            tree[str(path.relative_to(folder))] = (0, 0) if is_dir else (st.st_size, st.st_mtime_ns)
    return tree


def run_in_process(argv: list[str], timeout_s: float) -> tuple[int | None, str]:
    """``graphopt.cli.main(argv)`` with stderr captured and an alarm; (exit code, stderr)."""
    import contextlib
    import io as _io
    import signal

    from graphopt.cli import main

    def alarm(signum, frame):
        raise CaseTimeout

    err = _io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
            code = main(argv)
    except CaseTimeout:
        code = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGTERM, old_term)  # main() installs its own handler
    return code, err.getvalue()


def run_subprocess(argv: list[str], timeout_s: float) -> tuple[int | None, str]:
    import subprocess
    import sys

    env = {**os.environ, "GRAPHOPT_DEBUG": ""}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "graphopt", *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stderr


def _outputs_match(source: Path, output: Path) -> str:
    """'' when ``output`` loads and (if ORT runs the original) computes the same; else why."""
    from graphopt import io
    from graphopt.inputs import make_inputs
    from graphopt.output_errors import compare
    from graphopt.verify import run_model

    try:
        result = io.load(output).model
    except Exception as exc:
        return f"output does not load: {type(exc).__name__}: {exc}"
    try:
        original = io.load(source).model
        feeds = make_inputs(original)
        reference = run_model(original, feeds)
    except Exception:
        return ""  # the original does not run in ORT: nothing to compare with
    if [v.name for v in result.graph.outputs] != [v.name for v in original.graph.outputs]:
        return "output names changed"
    try:
        got = run_model(result, feeds)
    except Exception as exc:
        return f"output fails in ORT while the original ran: {str(exc).splitlines()[0][:200]}"
    for value, ref, new in zip(original.graph.outputs, reference, got, strict=True):
        err = compare(value.name, ref, new)
        if not err.shape_ok or err.detail or err.max_rel > 1e-4:
            return f"output {value.name!r} differs: {err.detail or err.max_rel}"
    return ""


def run_case(
    case: Case, folder: Path, *, subprocess: bool = False, timeout_s: float = 60.0
) -> Outcome:
    """Build ``case`` in ``folder`` and run ``graphopt optimize`` on it; list what went wrong.

    Allowed: exit 2 with one ``graphopt: error:`` line, exit 0 with an output that loads
    and matches the original in ORT, or exit 4 (written but not verified: ORT cannot run the
    original) with one such line and an output that loads, or exit 3 only as out of memory
    (a case asking for a 4 TiB tensor) with one ``out of memory while`` line and nothing
    written. Never a traceback, an internal error, a hang, or a file written anywhere but the
    output (and its data file) — temporary files included.
    """
    import tempfile
    import time

    case_dir = folder / "case"
    tmp_dir = folder / "tmp"
    case_dir.mkdir(parents=True)
    tmp_dir.mkdir()
    # The run's working folder: anything a library drops into the cwd is caught too.
    work_dir = folder / "cwd"
    work_dir.mkdir()
    source = case.build(case_dir)
    output = folder / "out" / "o.onnx"
    output.parent.mkdir()
    before = snapshot(folder)
    argv = ["optimize", str(source), "-o", str(output)]
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(tmp_dir)
    os.environ["TMPDIR"] = str(tmp_dir)
    start = time.perf_counter()
    saved_cwd = os.getcwd()
    os.chdir(work_dir)
    try:
        if subprocess:
            code, stderr = run_subprocess(argv, timeout_s)
        else:
            code, stderr = run_in_process(argv, timeout_s)
    finally:
        os.chdir(saved_cwd)
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
    seconds = time.perf_counter() - start
    problems: list[str] = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code is None:
        problems.append(f"hang: no exit within {timeout_s}s")
    elif code == 2:
        if len(lines) != 1 or not lines[0].startswith("graphopt: error:"):
            problems.append(f"exit 2 without exactly one error line: {stderr!r}")
    elif code == 3 and [line[:36] for line in lines] == ["graphopt: error: out of memory while"]:
        # Out of memory is exit 3 with its own line (README, exit codes), not an internal
        # error: the machine ran out, and nothing may be written.
        if output.exists():
            problems.append("out of memory but an output was written")
    elif code in (0, 4):
        if any("Traceback" in line for line in lines):
            problems.append("traceback on stderr")
        errors = [line for line in lines if line.startswith("graphopt: error:")]
        if code == 4 and (len(errors) != 1 or "written but not verified" not in errors[0]):
            problems.append(f"exit 4 without exactly one 'not verified' line: {stderr!r}")
        why = _outputs_match(source, output) if output.exists() else "exit 0 but no output"
        if why:
            problems.append(why)
    else:
        problems.append(f"exit {code}: {stderr.strip()[:300]}")
    if "Traceback" in stderr and not any(p.startswith("exit") for p in problems):
        problems.append("traceback on stderr")
    # What the user sees: graphopt's own lines (errors, warnings of its logger) only, not
    # ORT's or a library's log spam.
    foreign = [
        line
        for line in lines
        if not line.startswith(("graphopt:", "WARNING graphopt", "INFO graphopt"))
    ]
    if foreign:
        problems.append(f"foreign lines on stderr: {foreign[:2]}")
    after = snapshot(folder)
    # onnxruntime itself drops a 51-byte session-id file, $TMPDIR/.ses, once per process.
    allowed = {"out/o.onnx", "out/o.onnx.data", "tmp/.ses"}
    new = sorted(set(after) - set(before) - allowed)
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    gone = sorted(set(before) - set(after))
    if new:
        problems.append(f"files written outside the output: {new[:5]}")
    if changed or gone:
        problems.append(f"files modified or removed: {(changed + gone)[:5]}")
    if code == 2 and any(k.startswith("out/o.onnx") for k in after):
        problems.append("refused but wrote an output")
    return Outcome(case, code, stderr, seconds, problems)
