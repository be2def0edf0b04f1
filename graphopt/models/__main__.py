"""``python -m graphopt.models list | build NAME [-o PATH] | info NAME``."""

from __future__ import annotations

import argparse
import json
import sys

from graphopt.models import build, missing_requirements, names, read_sidecar, spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graphopt.models", description="Build and cache graphopt's test models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list catalog models")
    build_cmd = commands.add_parser("build", help="build a model (cached) and print its path")
    build_cmd.add_argument("name")
    build_cmd.add_argument("-o", "--output", help="copy the model here (plus NAME.onnx.json)")
    build_cmd.add_argument("--rebuild", action="store_true", help="ignore the cached copy")
    info_cmd = commands.add_parser("info", help="build if needed and print the JSON sidecar")
    info_cmd.add_argument("name")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in names():
            entry = spec(name)
            missing = missing_requirements(name)
            note = f"  [needs {', '.join(missing)}]" if missing else ""
            print(f"{name:<22} {entry.family:<13} {entry.description}{note}")
        return 0
    try:
        spec(args.name)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    missing = missing_requirements(args.name)
    if missing:
        print(
            f"error: model {args.name!r} needs {', '.join(missing)} "
            "(pip install 'graphopt[torch]')",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "build":
            print(build(args.name, args.output, rebuild=args.rebuild))
        else:
            print(json.dumps(read_sidecar(build(args.name)), indent=2))
    except (OSError, RuntimeError) as exc:  # unwritable -o folder, exporter failure
        print(f"error: cannot build {args.name!r}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
