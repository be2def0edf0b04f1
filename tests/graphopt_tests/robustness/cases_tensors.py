"""Hostile cases 10-13: huge declared dims, zero-size tensors, unsafe external data, tensors
whose data does not fit their shape."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt_tests.helpers import function_constant_file
from graphopt_tests.robustness.build import I64, F, _add, base_model, model, vi, writer

# --- 10. huge declared dims ------------------------------------------------------------------


def _huge(shape: list, dtype: int = F, op: str = "Relu") -> onnx.ModelProto:
    return model(
        [helper.make_node(op, ["x"], ["y"])], [vi("x", dtype, shape)], [vi("y", dtype, shape)]
    )


_add("huge_dims", "2pow40", writer(lambda: _huge([2**40])))
_add("huge_dims", "2pow40_x4", writer(lambda: _huge([1, 2**40, 4])))
_add("huge_dims", "2pow62", writer(lambda: _huge([2**62, 2**62])))
_add("huge_dims", "product_overflow", writer(lambda: _huge([2**31, 2**31, 2**31])))
_add("huge_dims", "int64_max", writer(lambda: _huge([2**63 - 1])))
_add("huge_dims", "negative_dim", writer(lambda: _huge([1, -5])))
_add("huge_dims", "just_over_limit", writer(lambda: _huge([1, 2**28])))
_add("huge_dims", "int64_2pow40", writer(lambda: _huge([2**40], I64, "Neg")))


def _huge_initializer_dims() -> onnx.ModelProto:
    w = TensorProto(name="w", data_type=F, dims=[2**40])  # no data at all
    return model(
        [helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", F, [1])], [vi("y", F, [1])], [w]
    )


_add("huge_dims", "initializer_2pow40_no_data", writer(_huge_initializer_dims))


def _huge_constant_of_shape() -> onnx.ModelProto:
    shape = onnx.numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "s")
    return model(
        [
            helper.make_node("ConstantOfShape", ["s"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["t"], keepdims=0),
            helper.make_node("Add", ["x", "t"], ["y"]),
        ],
        [vi("x", F, [1])],
        [vi("y", F, [1])],
        [shape],
    )


_add("huge_dims", "constant_of_shape_4tib", writer(_huge_constant_of_shape))

# --- 11. zero-size tensors -------------------------------------------------------------------


def _zero(kind: str) -> onnx.ModelProto:
    if kind == "input":
        return _huge([0, 4])
    if kind == "input_and_batch":
        return _huge([1, 0, 3])
    empty = onnx.numpy_helper.from_array(np.zeros((0, 4), np.float32), "e")
    if kind == "initializer_concat":
        return model(
            [helper.make_node("Concat", ["x", "e"], ["y"], axis=0)], [vi("x")], [vi("y")], [empty]
        )
    if kind == "add_empty":
        return model(
            [helper.make_node("Add", ["x", "e"], ["y"])],
            [vi("x")],
            [vi("y", F, [0, 4])],
            [empty],
        )
    if kind == "reshape_to_zero":
        shape = onnx.numpy_helper.from_array(np.array([0, 4], np.int64), "s")
        return model(
            [
                helper.make_node("Reshape", ["e", "s"], ["t"], allowzero=1),
                helper.make_node("Concat", ["x", "t"], ["y"], axis=0),
            ],
            [vi("x")],
            [vi("y")],
            [empty, shape],
            opset=17,
        )
    # matmul with a zero inner dim: output is zeros, not empty
    z = onnx.numpy_helper.from_array(np.zeros((0, 4), np.float32), "z")
    return model(
        [helper.make_node("MatMul", ["x", "z"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        [vi("x", F, [1, 0])],
        [vi("y", F, [1, 4])],
        [z],
    )


for _k in (
    "input",
    "input_and_batch",
    "initializer_concat",
    "add_empty",
    "reshape_to_zero",
    "matmul_zero_inner",
):
    _add("zero_size", _k, writer(lambda k=_k: _zero(k)))

# --- 12. external data -----------------------------------------------------------------------


def _external(folder: Path, location: str, set_info: dict[str, str] | None = None) -> Path:
    """base_model with every initializer in one data file, then its references rewritten."""
    proto = base_model(16)
    path = folder / "m.onnx"
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
            if set_info and entry.key in set_info:
                entry.value = set_info[entry.key]
        if set_info:
            present = {e.key for e in tensor.external_data}
            for key, value in set_info.items():
                if key not in present:
                    tensor.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())
    return path


def _ext_absolute(folder: Path) -> Path:
    return _external(folder, str((folder / "m.onnx.data").resolve()))


def _ext_dotdot(folder: Path) -> Path:
    sub = folder / "sub"
    sub.mkdir()
    _external(sub, "m.onnx.data")
    os.replace(sub / "m.onnx.data", folder / "m.onnx.data")
    return _external(sub, "../m.onnx.data")


def _ext_symlink_out(folder: Path) -> Path:
    sub = folder / "sub"
    sub.mkdir()
    path = _external(sub, "link.data")
    os.replace(sub / "m.onnx.data", folder / "real.data")
    (sub / "link.data").symlink_to(folder / "real.data")
    return path


def _ext_symlink_dir_out(folder: Path) -> Path:
    sub = folder / "sub"
    sub.mkdir()
    (folder / "outside").mkdir()
    path = _external(sub, "d/m.onnx.data")
    os.replace(sub / "m.onnx.data", folder / "outside" / "m.onnx.data")
    (sub / "d").symlink_to(folder / "outside", target_is_directory=True)
    return path


def _ext_missing(folder: Path) -> Path:
    path = _external(folder, "m.onnx.data")
    (folder / "m.onnx.data").unlink()
    return path


def _ext_short(folder: Path) -> Path:
    path = _external(folder, "m.onnx.data")
    data = folder / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    return path


def _ext_empty_file(folder: Path) -> Path:
    path = _external(folder, "m.onnx.data")
    (folder / "m.onnx.data").write_bytes(b"")
    return path


def _ext_dir(folder: Path) -> Path:
    path = _external(folder, "m.onnx.data")
    (folder / "m.onnx.data").unlink()
    (folder / "m.onnx.data").mkdir()
    return path


def _ext_fifo(folder: Path) -> Path:
    # A FIFO would block a reader forever: it must be refused, not opened.
    path = _external(folder, "m.onnx.data")
    (folder / "m.onnx.data").unlink()
    os.mkfifo(folder / "m.onnx.data")
    return path


def _ext_dev(folder: Path) -> Path:
    return _external(folder, "../../../../../../../../dev/zero")


def _ext_in_function(folder: Path, location: str) -> Path:
    """A local function's Constant stored at ``location``, relative to sub/; its file (16
    bytes) lies outside sub/, where ``location`` leads."""
    (folder / "outside.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (folder / "sub").mkdir()
    return function_constant_file(folder / "sub" / "m.onnx", location)


_add("external_data", "absolute", _ext_absolute)
_add(
    "external_data",
    "function_constant_absolute",
    lambda f: _ext_in_function(f, str((f / "outside.data").resolve())),
)
_add("external_data", "function_constant_dotdot", lambda f: _ext_in_function(f, "../outside.data"))
_add("external_data", "absolute_etc_passwd", lambda f: _external(f, "/etc/passwd"))
_add("external_data", "dotdot", _ext_dotdot)
_add("external_data", "dotdot_dev_zero", _ext_dev)
_add("external_data", "symlink_file_out", _ext_symlink_out)
_add("external_data", "symlink_dir_out", _ext_symlink_dir_out)
_add("external_data", "missing", _ext_missing)
_add("external_data", "short", _ext_short)
_add("external_data", "empty_file", _ext_empty_file)
_add("external_data", "is_a_folder", _ext_dir)
_add("external_data", "fifo", _ext_fifo)
_add("external_data", "empty_location", lambda f: _external(f, ""))
_add("external_data", "windows_drive", lambda f: _external(f, "C:\\x.data"))
_add("external_data", "backslash_dotdot", lambda f: _external(f, "..\\..\\x.data"))
_add("external_data", "nul_in_location", lambda f: _external(f, "m.onnx.data\0evil"))
_add("external_data", "negative_offset", lambda f: _external(f, "m.onnx.data", {"offset": "-8"}))
_add(
    "external_data", "offset_past_end", lambda f: _external(f, "m.onnx.data", {"offset": "999999"})
)
_add("external_data", "offset_not_number", lambda f: _external(f, "m.onnx.data", {"offset": "abc"}))
_add("external_data", "huge_length", lambda f: _external(f, "m.onnx.data", {"length": str(2**62)}))
_add("external_data", "length_too_small", lambda f: _external(f, "m.onnx.data", {"length": "4"}))

# --- 13. initializers with wrong byte sizes --------------------------------------------------


def _bad_tensor(kind: str) -> onnx.ModelProto:
    w = TensorProto(name="w", data_type=F, dims=[1, 4])
    good = np.arange(4, dtype=np.float32).tobytes()
    if kind == "raw_short":
        w.raw_data = good[:-3]
    elif kind == "raw_long":
        w.raw_data = good + b"\0" * 8
    elif kind == "raw_empty":
        w.raw_data = b""
    elif kind == "float_data_short":
        w.float_data.extend([1.0, 2.0])
    elif kind == "float_data_long":
        w.float_data.extend([1.0] * 9)
    elif kind == "both_fields":
        w.raw_data = good
        w.float_data.extend([1.0] * 4)
    elif kind == "wrong_field":
        w.int64_data.extend([1, 2, 3, 4])
    elif kind == "dtype_undefined":
        w.data_type = 0
        w.raw_data = good
    elif kind == "dtype_999":
        w.data_type = 999
        w.raw_data = good
    elif kind == "negative_dims":
        del w.dims[:]
        w.dims.extend([-1, 4])
        w.raw_data = good
    elif kind == "int64_odd_bytes":
        w.data_type = I64
        w.raw_data = b"\1" * 13
        return model(
            [
                helper.make_node("Cast", ["w"], ["c"], to=F),
                helper.make_node("Add", ["x", "c"], ["y"]),
            ],
            [vi("x")],
            [vi("y")],
            [w],
        )
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x")], [vi("y")], [w])


for _k in (
    "raw_short",
    "raw_long",
    "raw_empty",
    "float_data_short",
    "float_data_long",
    "both_fields",
    "wrong_field",
    "dtype_undefined",
    "dtype_999",
    "negative_dims",
    "int64_odd_bytes",
):
    _add("wrong_byte_size", _k, writer(lambda k=_k: _bad_tensor(k)))


def _bad_constant_attr() -> onnx.ModelProto:
    t = TensorProto(name="c", data_type=F, dims=[1, 4], raw_data=b"\0" * 5)
    return model(
        [
            helper.make_node("Constant", [], ["c"], value=t),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [vi("x")],
        [vi("y")],
    )


_add("wrong_byte_size", "constant_attr_raw_short", writer(_bad_constant_attr))
