"""Calibration data: named input arrays loaded from a user's ``.npz`` file, safely.

An ``.npz`` can hold pickled object arrays, and unpickling runs code the file's author chose.
Calibration files come from elsewhere (a colleague, a data pipeline), so they are opened with
``allow_pickle=False``: an object array is refused instead of unpickled. Every failure is a
one-line :class:`~graphopt.errors.UserInputError` (exit code 2), never a numpy traceback.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from graphopt.errors import UserInputError


def load_npz(path: str | os.PathLike, what: str = "calibration") -> dict[str, np.ndarray]:
    """{name: array} of every array in the ``.npz`` at ``path``; pickled data is refused.

    ``what`` names the file's purpose in messages (``--verify-inputs`` files use it too).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such {what} file")
    if not path.is_file():
        raise UserInputError(f"{path}: not a file, expected a {what} .npz")
    # A plain .npy (or a pickle) is not an archive of named arrays; checking first also keeps
    # np.load from taking the .npy or pickle branch at all.
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"{path}: not an .npz archive (expected numpy.savez output)")
    _check_declared_sizes(path, what)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise UserInputError(f"{path}: not an .npz archive")
            arrays = {name: _plain(path, name, archive[name]) for name in archive.files}
    except UserInputError:
        raise
    except ValueError as exc:
        # numpy's message for object arrays under allow_pickle=False.
        if "allow_pickle" in str(exc):
            raise UserInputError(
                f"{path}: holds pickled (object) arrays, which graphopt does not load; "
                "save plain numeric arrays"
            ) from None
        raise UserInputError(f"{path}: cannot read {what} data ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserInputError(f"{path}: corrupt {what} .npz ({exc})") from None
    except MemoryError:
        raise UserInputError(f"{path}: {what} arrays too large for this machine's memory") from None
    if not arrays:
        raise UserInputError(f"{path}: holds no arrays")
    return arrays


def _check_declared_sizes(path: Path, what: str) -> None:
    """Refuse a member whose ``.npy`` header declares more bytes than the member holds: numpy
    would allocate the declared size first (a few KB of file claiming 100 GB is a
    MemoryError, not a corrupt file). Unreadable headers are left to ``np.load``."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    reader = readers.get(np.lib.format.read_magic(member))
                    if reader is None:
                        continue
                    shape, _, dtype = reader(member)
                    available = info.file_size - member.tell()
                if dtype.hasobject:
                    continue  # refused when loaded, without allocating
                declared = math.prod(shape) * dtype.itemsize
                if declared > available:
                    raise UserInputError(
                        f"{path}: corrupt {what} .npz (array {info.filename[:-4]!r} declares "
                        f"shape {tuple(shape)}, {declared} bytes, but holds {available})"
                    )
    except UserInputError:
        raise
    except Exception:  # np.load reports what is wrong with the file
        return


def _plain(path: Path, name: str, array: np.ndarray | bytes) -> np.ndarray:
    # NpzFile hands back the raw bytes of a member that is not an .npy.
    if not isinstance(array, np.ndarray):
        raise UserInputError(f"{path}: member {name!r} is not a numpy array")
    # allow_pickle=False already refuses object arrays; structured dtypes without objects load
    # but are not tensors any model input takes.
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise UserInputError(f"{path}: array {name!r} has dtype {array.dtype}, not a tensor")
    return np.ascontiguousarray(array)
