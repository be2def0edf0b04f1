"""Error types that map to the CLI's documented exit codes."""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
# The output was written, but ONNX Runtime could not run the original model on generated
# inputs (or the comparison would prove nothing), so nothing shows the rewrite is exact.
EXIT_NOT_VERIFIED = 4
EXIT_INTERRUPTED = 130


class GraphoptError(Exception):
    """Base class for errors graphopt reports to the user as one line."""

    exit_code = EXIT_BAD_INPUT


class UserInputError(GraphoptError):
    """Bad input or usage: a missing file, a corrupt model, an unsafe path, a bad option."""

    exit_code = EXIT_BAD_INPUT


class CheckFailedError(GraphoptError):
    """A check the user asked for (verification, compare) did not hold."""

    exit_code = EXIT_CHECK_FAILED


# How ONNX Runtime words a failed allocation: its arena's "Failed to allocate memory for
# requested buffer of size N", or a kernel's C++ std::bad_alloc ("bad allocation" on MSVC). ORT
# raises these as generic errors, which graphopt would otherwise take for a failed check or a
# model ORT cannot run. Narrow on purpose: a check's reason also quotes output names.
_OUT_OF_MEMORY = re.compile(r"failed to allocate memory|std::bad_alloc|bad allocation", re.I)


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception or the message a check kept of one) is a failed
    allocation: Python's MemoryError or ONNX Runtime's allocation failures."""
    if isinstance(error, MemoryError):
        return True
    return bool(_OUT_OF_MEMORY.search(str(error)))


def is_rust_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is pyo3's PanicException, a Rust library's panic (tokenizers): a
    BaseException, so ``except Exception`` misses it (its module is not importable by name)."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"
