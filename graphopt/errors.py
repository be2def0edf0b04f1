"""Error types that map to the CLI's documented exit codes."""

from __future__ import annotations

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
