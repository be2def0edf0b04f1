"""Calibration .npz loading: plain arrays come back, pickles and non-archives are refused."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from graphopt.calibration import load_npz
from graphopt.errors import EXIT_BAD_INPUT, UserInputError


def test_plain_arrays_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    path = tmp_path / "calib.npz"
    np.savez_compressed(path, input=x, ids=ids)
    arrays = load_npz(path)
    assert set(arrays) == {"input", "ids"}
    np.testing.assert_array_equal(arrays["input"], x)
    np.testing.assert_array_equal(arrays["ids"], ids)
    assert arrays["input"].dtype == np.float32 and arrays["ids"].dtype == np.int64
    # Plain ndarrays, not views into a still-open archive.
    assert all(type(a) is np.ndarray for a in arrays.values())


class _Boom:
    """Unpickling this would run ``touch``: the loader must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_pickled_object_array_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, input=np.zeros(3, np.float32), evil=payload)
    with pytest.raises(UserInputError, match="pickled"):
        load_npz(path)
    assert not marker.exists()


def test_object_array_of_plain_values_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, input=np.array([1, "a", None], dtype=object))
    with pytest.raises(UserInputError, match="pickled"):
        load_npz(path)


def test_raw_pickle_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "calib.npz"
    path.write_bytes(pickle.dumps({"input": _Boom(marker)}))
    with pytest.raises(UserInputError, match=r"not an \.npz"):
        load_npz(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing.npz", None),
        ("plain.npy", "npy"),
        ("garbage.npz", b"\x00\x01 not a zip at all"),
        ("empty.npz", b""),
        ("folder.npz", "dir"),
        ("other.zip", "zip"),
        ("truncated.npz", "truncated"),
        ("nothing.npz", "empty-archive"),
        ("record.npz", "structured"),
    ],
)
def test_bad_files_are_one_line_user_errors(tmp_path: Path, name: str, content) -> None:
    path = tmp_path / name
    if content == "npy":
        np.save(path, np.zeros(3, np.float32))
        path = path.with_suffix(".npy")
    elif content == "dir":
        path.mkdir()
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("input.npy", b"not an npy header")
    elif content == "truncated":
        np.savez(path, input=np.zeros(1000, np.float32))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty-archive":
        np.savez(path)
    elif content == "structured":
        np.savez(path, rec=np.zeros(2, dtype=[("a", np.int32), ("b", np.float32)]))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError) as info:
        load_npz(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_loader_uses_allow_pickle_false() -> None:
    """The source itself says allow_pickle=False (the scan in test_safe_loading checks all)."""
    source = (Path(__file__).resolve().parents[2] / "graphopt" / "calibration.py").read_text()
    assert "np.load(path, allow_pickle=False)" in source


def test_a_fresh_process_refuses_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, evil=np.array([{"a": 1}], dtype=object))
    code = (
        "import sys\n"
        "from graphopt.calibration import load_npz\n"
        "from graphopt.errors import GraphoptError\n"
        "try:\n    load_npz(sys.argv[1])\n"
        "except GraphoptError as exc:\n    print(exc); sys.exit(exc.exit_code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "Traceback" not in proc.stderr and "pickled" in proc.stdout
