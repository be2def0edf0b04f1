"""graphopt's subcommands that live outside ``cli.py``.

Each module listed in :data:`COMMANDS` has ``add_parser(commands)`` (adds its subparser to
argparse's subparsers object) and ``run(args, out, err) -> int`` (the exit code). Every
``graphopt`` invocation imports these modules to build its parser, so their top level imports
nothing heavy (numpy, onnx and ORT are imported inside ``run``).
"""

from __future__ import annotations

# Subcommand name -> module under graphopt.commands.
COMMANDS: dict[str, str] = {
    "bench": "bench",
    "compare": "compare",
    "lint": "lint",
}
