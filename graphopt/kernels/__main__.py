"""``python -m graphopt.kernels build [--sanitize] [--ort-include DIR] | info``."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

from graphopt.errors import UserInputError

# GRAPHOPT_KERNELS_ISA tiers, lowest first (kernels.h's Isa).
TIERS = ("scalar", "avx2", "avx512", "avx512vnni")
# /proc/cpuinfo flags each tier needs on top of the one below (cpu_features.cc's rule).
TIER_FLAGS = {
    "avx2": ("avx", "avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512vnni": ("avx512_vnni",),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _tier_from_flags(flags: set[str]) -> str:
    tier = "scalar"
    for name in TIERS[1:]:
        if not all(flag in flags for flag in TIER_FLAGS[name]):
            break
        tier = name
    return tier


def _cap() -> str:
    """GRAPHOPT_KERNELS_ISA, "" when unset. A value naming no tier is a one-line
    UserInputError, as the library refuses it when ORT creates a kernel: a misspelt cap
    ("AVX2") must not leave the tier it meant to rule out in use."""
    cap = os.environ.get("GRAPHOPT_KERNELS_ISA", "")
    if cap and cap not in TIERS:
        raise UserInputError(
            f"GRAPHOPT_KERNELS_ISA={cap!r} names no tier: use {', '.join(TIERS)}, or unset it"
        )
    return cap


def _capped(tier: str) -> str:
    cap = _cap()
    if cap and TIERS.index(cap) < TIERS.index(tier):
        return cap
    return tier


def info() -> int:
    from graphopt.backends import ort_custom_ops
    from graphopt.kernels import library_path, unavailable_reason
    from graphopt.kernels.build import TEST_BINARY

    _cap()  # an unknown cap: the error sessions would give, before anything is printed
    flags = _cpu_flags()
    shown = ("avx", "avx2", "fma", "f16c", *TIER_FLAGS["avx512"], "avx512_vnni")
    print(f"machine: {platform.machine()} {sys.platform}")
    print("cpu flags: " + " ".join(f"{f}{'+' if f in flags else '-'}" for f in shown))
    library = library_path()
    print(f"library: {library if library else 'not built'}")
    if library is None:
        print(f"reason: {unavailable_reason()}")
        print(f"isa (from /proc/cpuinfo): {_capped(_tier_from_flags(flags))}")
        return 0
    # The library's own answer (cpuid + xgetbv, the OS's AVX-512 state included) from the test
    # binary built beside it, in the same trusted folder.
    binary = library.parent / TEST_BINARY
    if binary.is_file():
        done = subprocess.run([binary, "--info"], capture_output=True, text=True, check=False)
        print(done.stdout.strip() or f"{binary} --info failed: {done.stderr.strip()}")
    else:
        print(f"isa (from /proc/cpuinfo): {_capped(_tier_from_flags(flags))}")
    print(f"trusted build folder: {ort_custom_ops.build_dir()}")
    return 0


def build(args: argparse.Namespace) -> int:
    from graphopt.kernels.build import BuildFailed, build_library, build_sanitized_tests

    try:
        if args.sanitize:
            print(build_sanitized_tests())
        else:
            print(build_library(args.ort_include))
    except BuildFailed as exc:
        print(f"graphopt.kernels: build failed: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="build the custom-op library (CMake + Ninja)")
    build_parser.add_argument(
        "--sanitize", action="store_true", help="build the ASan+UBSan test binary instead"
    )
    build_parser.add_argument(
        "--ort-include", type=Path, help="use these ORT 1.21 headers instead of fetching them"
    )
    sub.add_parser("info", help="CPU features, the ISA tier selected, whether it is built")
    args = parser.parse_args(argv)
    try:
        return build(args) if args.command == "build" else info()
    except UserInputError as exc:  # BuildUnavailable: a tool is missing, one line
        print(f"graphopt.kernels: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
