"""Build graphopt's sparse-kernel library (``python -m graphopt.kernels build``).

Two steps:

1. **ORT headers.** The library is compiled against ONNX Runtime's C/C++ API headers, which
   the onnxruntime wheel does not ship. They come from Debian 13's ``libonnxruntime-dev``
   (1.21, API 21; any newer runtime loads an API-21 library), fetched once with
   ``apt-get download`` under a private apt configuration in a temporary folder (the system's
   sources, lists and dpkg state are never touched) and unpacked with ``dpkg -x`` into a
   per-user cache, ``~/.cache/graphopt/ort-headers/<version>/``, reused afterwards.
2. **CMake + Ninja** into :func:`graphopt.backends.ort_custom_ops.build_dir` (the folder the
   load policy trusts), or, when the installed package folder is read-only, into
   :func:`graphopt.backends.ort_custom_ops.user_build_dir` (trusted only then).

``--sanitize`` builds the standalone test binary under ASan + UBSan into its own folder
(``_build_sanitize`` beside ``_build``); it needs no ORT headers.

A missing tool is a :class:`BuildUnavailable` with a one-line reason (the command exits 2);
a compiler or download failure is a :class:`BuildFailed` carrying the tool's output (exit 1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from graphopt.backends import ort_custom_ops
from graphopt.errors import UserInputError

KERNELS_DIR = Path(__file__).resolve().parent
ORT_HEADERS_PACKAGE = "libonnxruntime-dev"
ORT_HEADERS_VERSION = "1.21.0"  # the cache folder's name; the fetched version is checked
DEBIAN_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian trixie main"
)
TEST_BINARY = "graphopt_kernel_tests"

Progress = Callable[[str], None]


class BuildUnavailable(UserInputError):
    """This machine lacks something the build needs (a tool, the headers); one line."""


class BuildFailed(RuntimeError):
    """A build step ran and failed; the message ends with the step's output."""


def _stderr_progress(message: str) -> None:
    print(f"graphopt.kernels: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``~/.cache/graphopt`` of the current account (home from the password database)."""
    if os.name == "posix":
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "graphopt"
    return Path.home() / ".cache" / "graphopt"


def missing_tools(headers_cached: bool = True) -> list[str]:
    """The build's tools not on PATH (apt-get and dpkg only matter without cached headers)."""
    missing = []
    if not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++17 compiler (g++)")
    if not shutil.which("cmake"):
        missing.append("cmake")
    if not headers_cached:
        missing += [tool for tool in ("apt-get", "dpkg") if not shutil.which(tool)]
    return missing


def unavailable_reason() -> str:
    """Why this machine cannot build the library, or "" when it can (as far as tools go)."""
    if not sys.platform.startswith("linux"):
        return f"building graphopt's kernels is supported on Linux only (this is {sys.platform})"
    missing = missing_tools(headers_cached=cached_headers() is not None)
    if missing:
        return f"cannot build graphopt's kernels here: {', '.join(missing)} not found on PATH"
    return ""


# ---- ORT headers ---------------------------------------------------------------------------


def _headers_ok(include: Path) -> bool:
    return (include / "onnxruntime_cxx_api.h").is_file() and (
        include / "onnxruntime_c_api.h"
    ).is_file()


def cached_headers() -> Path | None:
    """The cached ORT include folder (holding ``onnxruntime_c_api.h``), if fetched before."""
    include = cache_root() / "ort-headers" / ORT_HEADERS_VERSION / "include" / "onnxruntime"
    return include if _headers_ok(include) else None


def _run(command: Sequence[str | os.PathLike], what: str, **kwargs) -> str:
    try:
        done = subprocess.run(
            [os.fspath(c) for c in command],
            capture_output=True,
            text=True,
            check=False,
            **kwargs,
        )
    except FileNotFoundError:
        raise BuildUnavailable(f"{what}: {command[0]} not found on PATH") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        tail = "\n".join(output.splitlines()[-40:])
        raise BuildFailed(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _write_apt_root(root: Path) -> Path:
    for sub in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "etc/apt/sources.list").write_text(DEBIAN_SOURCE + "\n")
    config = root / "apt.conf"
    config.write_text(
        f'Dir "{root}/";\n'
        f'Dir::State "{root}/var/lib/apt";\n'
        f'Dir::State::status "{root}/var/lib/dpkg/status";\n'
        f'Dir::Cache "{root}/var/cache/apt";\n'
        f'Dir::Etc "{root}/etc/apt";\n'
        'Dir::Etc::trusted "/etc/apt/trusted.gpg";\n'
        'Dir::Etc::trustedparts "/etc/apt/trusted.gpg.d";\n'
    )
    return config


def fetch_ort_headers(progress: Progress = _stderr_progress) -> Path:
    """The ORT include folder: the cached one, or fetched from Debian into the cache."""
    cached = cached_headers()
    if cached is not None:
        progress(f"ORT headers: {cached} (cached)")
        return cached
    missing = [tool for tool in ("apt-get", "dpkg") if not shutil.which(tool)]
    if missing:
        raise BuildUnavailable(
            f"no ORT {ORT_HEADERS_VERSION} headers cached and {', '.join(missing)} not found "
            f"(needed to fetch {ORT_HEADERS_PACKAGE}); pass --ort-include DIR instead"
        )
    if not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file():
        raise BuildUnavailable(
            "no Debian archive keyring (/usr/share/keyrings/debian-archive-keyring.gpg) to "
            f"verify {ORT_HEADERS_PACKAGE}; pass --ort-include DIR instead"
        )
    target = cache_root() / "ort-headers" / ORT_HEADERS_VERSION
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    progress(f"ORT headers: fetching {ORT_HEADERS_PACKAGE} from Debian trixie (one time)")
    with tempfile.TemporaryDirectory(prefix="graphopt-ort-headers-") as scratch:
        root = Path(scratch)
        env = {**os.environ, "APT_CONFIG": str(_write_apt_root(root))}
        download = root / "dl"
        download.mkdir()
        # apt-get update only warns when the mirror is unreachable; the download then fails.
        try:
            _run(["apt-get", "-q", "update"], "apt-get update (private config)", env=env)
            _run(
                ["apt-get", "download", ORT_HEADERS_PACKAGE],
                f"apt-get download {ORT_HEADERS_PACKAGE}",
                env=env,
                cwd=download,
            )
        except BuildFailed as exc:
            raise BuildFailed(f"{exc}\n(no network to deb.debian.org?)") from None
        debs = sorted(download.glob("*.deb"))
        if len(debs) != 1:
            raise BuildFailed(f"apt-get download left {len(debs)} .deb files, expected 1")
        if f"_{ORT_HEADERS_VERSION}" not in debs[0].name:
            raise BuildFailed(
                f"Debian now ships {debs[0].name}, not {ORT_HEADERS_VERSION}: update "
                "ORT_HEADERS_VERSION in graphopt/kernels/build.py after checking the API"
            )
        extracted = root / "x"
        _run(["dpkg", "-x", debs[0], extracted], f"dpkg -x {debs[0].name}")
        include = extracted / "usr" / "include" / "onnxruntime"
        if not _headers_ok(include):
            raise BuildFailed(f"{debs[0].name} holds no onnxruntime_cxx_api.h")
        # Into place with one rename, so a concurrent or interrupted fetch never leaves a
        # half-copied cache that later builds would trust.
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        shutil.copytree(include, staging / "include" / "onnxruntime")
        try:
            staging.rename(target)
        except OSError:  # another build put it there first
            shutil.rmtree(staging, ignore_errors=True)
    headers = cached_headers()
    if headers is None:
        raise BuildFailed(f"ORT headers not found in {target} after fetching")
    progress(f"ORT headers: {headers}")
    return headers


# ---- CMake ---------------------------------------------------------------------------------


def library_build_dir() -> Path:
    """Where the library is built: the package's ``_build`` or, read-only, the user cache."""
    if ort_custom_ops.package_build_writable():
        return ort_custom_ops.build_dir()
    folder = ort_custom_ops.user_build_dir()
    if folder is None:
        raise BuildUnavailable(
            f"{ort_custom_ops.build_dir()} is not writable and this platform has no per-user "
            "build folder"
        )
    return folder


def sanitize_build_dir() -> Path:
    """Where the sanitizer test binary is built (beside the library's build folder)."""
    folder = library_build_dir()
    return folder.with_name(folder.name + "_sanitize")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One build per folder at a time (concurrent ninja runs in one tree corrupt it)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / ".build.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cmake(folder: Path, options: Sequence[str], target: str, progress: Progress) -> None:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not generator and not (folder / "CMakeCache.txt").exists():
        progress("ninja not found: using CMake's default generator")
    cache = folder / "CMakeCache.txt"
    if cache.exists() and generator and "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache.read_text():
        generator = []  # keep the generator the folder was configured with
    progress(f"configuring in {folder}")
    _run(
        ["cmake", "-S", KERNELS_DIR, "-B", folder, *generator, *options],
        "cmake configure",
    )
    progress(f"compiling {target}")
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    _run(["cmake", "--build", folder, "--target", target, "-j", jobs], f"building {target}")


def build_library(ort_include: Path | None = None, progress: Progress = _stderr_progress) -> Path:
    """Build ``libgraphopt_kernels`` (and the plain test binary); return the library's path."""
    reason = unavailable_reason()
    if reason and not (ort_include and not missing_tools()):
        raise BuildUnavailable(reason)
    if ort_include is not None:
        include = Path(ort_include).resolve()
        if not _headers_ok(include):
            raise BuildUnavailable(f"--ort-include {ort_include}: no onnxruntime_cxx_api.h there")
    else:
        include = fetch_ort_headers(progress)
    folder = library_build_dir()
    with _locked(folder):
        _cmake(
            folder,
            [
                f"-DORT_INCLUDE_DIR={include}",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGRAPHOPT_SANITIZE=OFF",
            ],
            "all",
            progress,
        )
    library = folder / ort_custom_ops.LIBRARY_NAME
    if not library.is_file():
        raise BuildFailed(f"the build finished but {library} is missing")
    progress(f"built {library}")
    return library


def build_sanitized_tests(progress: Progress = _stderr_progress) -> Path:
    """Build the ASan + UBSan test binary; return its path."""
    reason = unavailable_reason()
    if reason and missing_tools():
        raise BuildUnavailable(reason)
    folder = sanitize_build_dir()
    with _locked(folder):
        _cmake(
            folder,
            ["-DGRAPHOPT_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"],
            TEST_BINARY,
            progress,
        )
    binary = folder / TEST_BINARY
    if not binary.is_file():
        raise BuildFailed(f"the build finished but {binary} is missing")
    progress(f"built {binary} (ASan + UBSan)")
    return binary
