"""Safe loading and saving: sources, lazy external data, atomic writes, refusals via the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.inputs import make_inputs
from graphopt.verify import run_model
from graphopt_tests.helpers import function_constant_file
from graphopt_tests.robustness.cases_strings import STRING_FIELDS, text_rich_bytes, text_rich_model
from graphopt_tests.robustness.stringflip import flip_in_strings

F = TensorProto.FLOAT


def small_proto(weight_elems: int = 64) -> onnx.ModelProto:
    """x[1,n] @ w[n,n] + b, with a doc string, metadata and value_info."""
    n = int(np.sqrt(weight_elems))
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], doc_string="matmul doc"),
            helper.make_node("Add", ["h", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, [1, n])],
        [helper.make_tensor_value_info("y", F, [1, n])],
        [w, b],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("h", F, [1, n])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, doc_string="model doc"
    )
    helper.set_model_props(proto, {"k": "v"})
    return proto


def save_external(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


# --- loading ------------------------------------------------------------------------------


def test_load_from_path_bytes_proto_and_model(tmp_path: Path) -> None:
    proto = small_proto()
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, path)
    for source in (path, str(path), path.read_bytes(), proto):
        loaded = io.load(source)
        assert [v.name for v in loaded.model.graph.outputs] == ["y"]
        assert not loaded.uses_external_data
    model = io.load(proto).model
    assert io.load(model).model is model
    assert io.load(path).path == path


def test_external_data_is_lazy(tmp_path: Path) -> None:
    path = save_external(small_proto(), tmp_path / "m.onnx")
    loaded = io.load(path)
    assert loaded.uses_external_data
    tensors = [v.const_value for v in loaded.model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert io.external_data_files(loaded.model) == {tmp_path / "m.onnx.data"}
    # The data is still readable through the lazy tensor.
    w = loaded.model.graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(w, onnx.numpy_helper.to_array(small_proto().graph.initializer[0]))


# --- saving -------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_is_atomic_when_serialization_fails(tmp_path: Path, monkeypatch) -> None:
    model = io.load(small_proto()).model
    target = tmp_path / "out.onnx"

    def broken(model, path):
        Path(path).write_bytes(b"partial")
        raise UserInputError("simulated failure")

    monkeypatch.setattr(io, "_save_inline", broken)
    with pytest.raises(UserInputError):
        io.save(model, target)
    assert not target.exists()
    assert _leftovers(tmp_path) == []
    # An existing output survives a failed save unchanged.
    target.write_bytes(b"previous")
    with pytest.raises(UserInputError):
        io.save(model, target)
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_write_file_atomically_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "e.plan"
    assert io.write_file_atomically(target, lambda handle: handle.write(b"new")) == target
    assert target.read_bytes() == b"new"

    def full_disk(handle) -> None:
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserInputError, match=r"e\.plan: cannot be written \(No space left"):
        io.write_file_atomically(target, full_disk)
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []
    link = tmp_path / "link.plan"
    link.symlink_to(target)
    with pytest.raises(UserInputError, match="symbolic link"):
        io.write_file_atomically(link, lambda handle: handle.write(b"x"))
    assert target.read_bytes() == b"new"


def test_save_inline_and_external(tmp_path: Path) -> None:
    model = io.load(small_proto()).model
    inline = io.save(model, tmp_path / "a.onnx", external_data=False)
    assert not (tmp_path / "a.onnx.data").exists()
    external = io.save(io.load(small_proto(1024)).model, tmp_path / "b.onnx", external_data=True)
    assert (tmp_path / "b.onnx.data").stat().st_size == 1024 * 4
    assert io.load(external).uses_external_data
    for path, source in ((inline, model), (external, io.load(small_proto(1024)).model)):
        onnx.checker.check_model(str(path))
        again = io.load(path).model
        np.testing.assert_array_equal(
            again.graph.initializers["w"].const_value.numpy(),
            source.graph.initializers["w"].const_value.numpy(),
        )
    assert _leftovers(tmp_path) == []


def test_automatic_external_data_past_limit(tmp_path: Path, monkeypatch) -> None:
    # 32×32 fp32 = 4 KB: above the size under which tensors stay inline.
    model = io.load(small_proto(1024)).model
    assert not io.needs_external_data(model)
    # Pretend protobuf's limit is tiny instead of writing 2 GB.
    monkeypatch.setattr(io, "PROTOBUF_LIMIT_BYTES", 100)
    monkeypatch.setattr(io, "EXTERNAL_DATA_MARGIN_BYTES", 0)
    assert io.needs_external_data(model)
    io.save(model, tmp_path / "auto.onnx")
    assert (tmp_path / "auto.onnx.data").is_file()
    assert io.load(tmp_path / "auto.onnx").uses_external_data


def test_save_refuses_missing_folder_and_folder_target(tmp_path: Path) -> None:
    model = io.load(small_proto()).model
    with pytest.raises(UserInputError, match="does not exist"):
        io.save(model, tmp_path / "nope" / "m.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(UserInputError, match="is a folder"):
        io.save(model, tmp_path / "d.onnx")


def _proto_with_subgraphs_and_functions() -> onnx.ModelProto:
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", F, [2])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["s_in", "x"], ["s_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", F, [2]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", F, [2]),
        ],
    )
    fn = helper.make_function(
        "local",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g),
            helper.make_node("Loop", ["n", "c", "z"], ["l"], body=body),
            helper.make_node("Twice", ["l"], ["y"], domain="local"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", F, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", F, [2])],
        value_info=[helper.make_tensor_value_info("z", F, [2])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
        ir_version=8,
        doc_string="model doc",
        producer_name="test",
    )
    helper.set_model_props(proto, {"author": "me", "license": "x"})
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("external", [False, True])
def test_round_trip_keeps_everything(tmp_path: Path, external: bool) -> None:
    proto = _proto_with_subgraphs_and_functions()
    path = io.save(io.load(proto).model, tmp_path / "r.onnx", external_data=external)
    again = onnx.load(str(path))
    onnx.checker.check_model(again)
    assert {(o.domain, o.version) for o in again.opset_import} == {("", 17), ("local", 1)}
    assert [(f.domain, f.name) for f in again.functions] == [("local", "Twice")]
    assert {p.key: p.value for p in again.metadata_props} == {"author": "me", "license": "x"}
    assert again.doc_string == "model doc" and again.producer_name == "test"
    assert "z" in {v.name for v in again.graph.value_info}
    ops = [n.op_type for n in again.graph.node]
    assert ops == ["If", "Loop", "Twice"]
    if_node = again.graph.node[0]
    branches = {a.name: a.g.node[0].op_type for a in if_node.attribute}
    assert branches == {"then_branch": "Relu", "else_branch": "Neg"}
    assert [n.op_type for n in again.graph.node[1].attribute[0].g.node] == ["Identity", "Add"]


def test_round_trip_keeps_doc_strings_and_value_info(tmp_path: Path) -> None:
    path = io.save(io.load(small_proto()).model, tmp_path / "r.onnx")
    again = onnx.load(str(path))
    assert again.graph.doc_string == "graph doc"
    assert again.graph.node[0].doc_string == "matmul doc"
    # onnx-ir also writes value_info for initializers; the declared one must survive.
    info = {v.name: v for v in again.graph.value_info}
    assert [d.dim_value for d in info["h"].type.tensor_type.shape.dim] == [1, 8]


# --- refusals through the CLI -------------------------------------------------------------


def _external_with_location(tmp_path: Path, location: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    path = save_external(small_proto(), folder / "m.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())
    return path


def _corrupt(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "good.onnx"
    onnx.save_model(small_proto(), good)
    data = good.read_bytes()
    path = tmp_path / f"{kind}.onnx"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bitflip":
        flipped = bytearray(data)
        # The first byte is the tag of ir_version (field 1, varint): 0x08. Setting the
        # wire-type bits to 7 makes it an invalid tag, which protobuf refuses.
        flipped[0] ^= 0x07
        path.write_bytes(bytes(flipped))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a model\n" * 10)
    elif kind == "folder":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("truncated", "truncated or corrupt"),
        ("bitflip", "not a valid ONNX protobuf"),
        ("empty", "not an ONNX model"),
        ("garbage", "truncated or corrupt"),
        ("folder", "is a folder"),
    ],
)
def test_cli_refuses_bad_files(tmp_path: Path, capsys, kind: str, message: str) -> None:
    path = _corrupt(tmp_path, kind)
    code, _, err = run_cli(["optimize", str(path)], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / f"{kind}.opt.onnx").exists()


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../outside.data", "leaves the model's folder"),
        ("sub/../../outside.data", "leaves the model's folder"),
        ("link.data", "leaves the model's folder"),
        ("nothing.data", "is missing"),
        # Inside the folder as text, but the OS cannot walk through a missing "nosuch".
        ("nosuch/../m.onnx.data", "is missing"),
        (".", "'.' is a folder, not a file"),
        ("sub", "'sub' is a folder, not a file"),
    ],
)
def test_cli_refuses_unsafe_external_data(
    tmp_path: Path, capsys, location: str, message: str
) -> None:
    outside = tmp_path / "outside.data"
    outside.write_bytes(b"\0" * 4096)
    path = _external_with_location(tmp_path, location)
    (path.parent / "sub").mkdir()
    (path.parent / "link.data").symlink_to(outside)
    code, _, err = run_cli(["optimize", str(path)], capsys)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("location", ["/etc/hostname", "../outside.data", "m.onnx.data"])
@pytest.mark.parametrize("form", ["bytes", "proto"])
def test_a_model_in_memory_reads_no_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location: str, form: str
) -> None:
    """Bytes or a ModelProto skipped the external-data checks: their locations were read from
    the working folder, so a model could pull any file (/etc/hostname) into the output."""
    path = _external_with_location(tmp_path, location)
    monkeypatch.chdir(path.parent)
    proto = onnx.load(str(path), load_external_data=False)
    source = proto.SerializeToString() if form == "bytes" else proto
    with pytest.raises(UserInputError, match="a model given in memory has no folder") as info:
        io.load(source)
    assert "\n" not in str(info.value)
    # What the message suggests works: the data read in by onnx.load.
    if location == "m.onnx.data":
        assert io.load(onnx.load(str(path))).model.graph.initializers


def _function_constant_model(folder: Path, location: str) -> Path:
    return function_constant_file(folder / "m.onnx", location)


@pytest.mark.parametrize(
    ("location", "message"),
    [("/etc/passwd", "is absolute"), ("../outside.data", "leaves the model's folder")],
)
def test_function_constants_external_data_is_checked(
    tmp_path: Path, capsys, location: str, message: str
) -> None:
    # A local function's Constant is folded like the graph's: it must not read outside.
    (tmp_path / "outside.data").write_bytes(b"secret!!" * 2)
    folder = tmp_path / "model"
    folder.mkdir()
    path = _function_constant_model(folder, location)
    for command in (["optimize", str(path), "--no-verify"], ["inspect", str(path)]):
        code, _, err = run_cli(command, capsys)
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (folder / "m.opt.onnx").exists()


@pytest.mark.parametrize("flags", [[], ["--external-data"]])
def test_function_constants_read_from_the_model_folder(
    tmp_path: Path, capsys, monkeypatch, flags: list[str]
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "c.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = _function_constant_model(folder, "c.data")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # A file of the same name in the working folder must not be what is read.
    (elsewhere / "c.data").write_bytes(np.full(4, 100, np.float32).tobytes())
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["optimize", str(path), "-o", str(out), *flags], capsys)
    assert code == 0, err
    # The output holds the values itself (its folder has no c.data to point at).
    x = np.ones(4, np.float32)
    (y,) = run_model(io.load(out).model, {"x": x})
    np.testing.assert_array_equal(y, x + np.arange(4, dtype=np.float32))


def test_cli_refuses_external_length_unlike_the_tensor(tmp_path: Path, capsys) -> None:
    # 8 bytes stated for a 16-byte tensor: onnx-ir would read 16, ORT refuses.
    path = _function_constant_model(tmp_path, "c.data")
    (tmp_path / "c.data").write_bytes(b"\0" * 16)
    proto = onnx.load(path, load_external_data=False)
    entry = proto.functions[0].node[0].attribute[0].t.external_data[2]
    entry.value = "8"
    path.write_bytes(proto.SerializeToString())
    code, _, err = run_cli(["inspect", str(path)], capsys)
    assert code == 2 and "does not match the tensor's 16 bytes" in err, err


def test_cli_refuses_short_data_file(tmp_path: Path, capsys) -> None:
    path = save_external(small_proto(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    code, _, err = run_cli(["optimize", str(path)], capsys)
    assert code == 2
    assert "too short" in err


def test_symlink_inside_folder_is_allowed(tmp_path: Path) -> None:
    path = save_external(small_proto(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").rename(tmp_path / "real.data")
    (tmp_path / "m.onnx.data").symlink_to(tmp_path / "real.data")
    assert io.load(path).uses_external_data


def test_load_never_crashes_on_flipped_bytes(tmp_path: Path) -> None:
    """Every single-byte corruption of a small model loads or is refused as user input."""
    data = bytearray(small_proto(16).SerializeToString())
    rng = np.random.default_rng(0)
    for position in rng.choice(len(data), size=min(60, len(data)), replace=False):
        corrupt = bytearray(data)
        corrupt[position] ^= 0xFF
        with contextlib.suppress(UserInputError):
            io.load(bytes(corrupt))


# --- never touching the input ----------------------------------------------------------


def test_input_is_never_modified(tmp_path: Path, capsys) -> None:
    path = save_external(small_proto(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    before = (sha(path), sha(data))
    code, _, _ = run_cli(["optimize", str(path)], capsys)
    assert code == 0
    assert (sha(path), sha(data)) == before
    # The output loads (its tensors are small, so they may all be written inline).
    assert io.load(tmp_path / "m.opt.onnx").model.graph.outputs


def test_output_equal_to_input_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(), path)
    before = sha(path)
    (tmp_path / "alias.onnx").symlink_to(path)
    for output in (str(path), str(tmp_path / "." / "m.onnx"), str(tmp_path / "alias.onnx")):
        code, _, err = run_cli(["optimize", str(path), "-o", output], capsys)
        assert code == 2 and "--in-place" in err
    assert sha(path) == before


def test_output_data_file_clashing_with_input_data_is_refused(tmp_path: Path, capsys) -> None:
    # Input weights live in "x.onnx.data"; an output named x.onnx elsewhere in the same
    # folder would write its data over them.
    folder = tmp_path / "f"
    folder.mkdir()
    path = save_external(small_proto(), folder / "x.onnx")
    other = folder / "y.onnx"
    path.rename(other)
    code, _, err = run_cli(["optimize", str(other), "-o", str(folder / "x.onnx")], capsys)
    assert code == 2 and "would overwrite" in err


def test_output_equal_to_input_data_file_is_refused(tmp_path: Path, capsys) -> None:
    path = save_external(small_proto(1024), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    before = sha(data)
    code, _, err = run_cli(["optimize", str(path), "-o", str(data)], capsys)
    assert code == 2 and "input's external-data file" in err
    assert sha(data) == before


def test_missing_output_folder_is_refused_early(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(), path)
    code, out, err = run_cli(["optimize", str(path), "-o", str(tmp_path / "no" / "o.onnx")], capsys)
    assert code == 2 and "does not exist" in err
    assert "passes" not in out  # refused before the pipeline ran


def test_in_place_replaces_atomically(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(), path)
    inode = path.stat().st_ino
    code, _, _ = run_cli(["optimize", str(path), "--in-place"], capsys)
    assert code == 0
    # Replaced by rename, not rewritten in place: a reader never sees a half-written file.
    assert path.stat().st_ino != inode
    onnx.checker.check_model(str(path))
    assert _leftovers(tmp_path) == []
    code, _, err = run_cli(["optimize", str(path), "--in-place", "-o", "x.onnx"], capsys)
    assert code == 2 and "mutually exclusive" in err


def test_cli_external_data_flag(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(1024), path)
    out = tmp_path / "o.onnx"
    code, _, _ = run_cli(["optimize", str(path), "-o", str(out), "--external-data"], capsys)
    assert code == 0
    assert (tmp_path / "o.onnx.data").is_file()
    assert io.load(out).uses_external_data


# --- end to end through the console script --------------------------------------------------


def _graphopt() -> list[str]:
    exe = Path(sys.executable).parent / "graphopt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graphopt"]


@pytest.mark.parametrize("kind", ["truncated", "missing"])
def test_console_script_refusal(tmp_path: Path, kind: str) -> None:
    path = _corrupt(tmp_path, kind)
    proc = subprocess.run(
        [*_graphopt(), "optimize", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "GRAPHOPT_DEBUG": ""},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("graphopt: error:")


def test_console_script_optimize_and_inspect(tmp_path: Path) -> None:
    path = save_external(small_proto(1024), tmp_path / "m.onnx")
    proc = subprocess.run([*_graphopt(), "optimize", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "verification" in proc.stdout and "wrote" in proc.stdout
    proc = subprocess.run(
        [*_graphopt(), "inspect", str(tmp_path / "m.opt.onnx"), "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"external_data": true' in proc.stdout


def test_in_place_with_external_data(tmp_path: Path, capsys) -> None:
    path = save_external(small_proto(1024), tmp_path / "m.onnx")
    original = io.load(path).model
    feeds = make_inputs(original)
    (before,) = run_model(original, feeds)
    code, _, err = run_cli(["optimize", str(path), "--in-place"], capsys)
    assert code == 0, err
    loaded = io.load(path)
    assert loaded.uses_external_data
    # The new weights were read from the old data file while the new one was written.
    (after,) = run_model(loaded.model, feeds)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def _large_weights_proto() -> onnx.ModelProto:
    """Initializers above and below io.STREAM_THRESHOLD_BYTES, of several dtypes."""
    rng = np.random.default_rng(1)
    n = 600  # 600x600 float32 = 1.4 MB: streamed
    weights = {
        "w": rng.standard_normal((n, n)).astype(np.float32),
        "b": rng.standard_normal(n).astype(np.float32),  # small: stays in the message
        "h": rng.standard_normal((n, n)).astype(np.float16),  # 0.7 MB: stays
        "idx": rng.integers(0, n, size=(300_000,), dtype=np.int64),  # 2.4 MB: streamed
        "big_h": rng.standard_normal((2, n, n)).astype(np.float16),  # 1.4 MB: streamed
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xh", "h"], ["mh"]),
        helper.make_node("MatMul", ["mh", "big_h"], ["y2"]),
        helper.make_node("Gather", ["b", "idx"], ["y3"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [1, n])],
        [
            helper.make_tensor_value_info("y", F, [1, n]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT16, [2, 1, n]),
            helper.make_tensor_value_info("y3", F, [300_000]),
        ],
        [onnx.numpy_helper.from_array(a, k) for k, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("source", ["proto", "external", "numpy"])
def test_inline_save_streams_large_initializers(tmp_path: Path, source: str) -> None:
    proto = _large_weights_proto()
    if source == "external":
        # save_external converts the proto it is given: hand it a copy.
        model = io.load(save_external(_large_weights_proto(), tmp_path / "in.onnx")).model
    else:
        model = io.load(proto).model
    if source == "numpy":  # in-memory tensors, as constant folding creates them
        for value in model.graph.initializers.values():
            value.const_value = ir.tensor(value.const_value.numpy())
    path = io.save(model, tmp_path / "out.onnx", external_data=False)
    assert not (tmp_path / "out.onnx.data").exists()
    again = onnx.load(str(path))
    onnx.checker.check_model(again)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in again.graph.initializer}
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    # The IR is left as it was: the stand-ins are swapped back.
    assert all(v.const_value.nbytes > 0 for v in model.graph.initializers.values())
    feeds = make_inputs(io.load(proto).model, {}, seed=0)
    for ref, out in zip(
        run_model(io.load(proto).model, feeds), run_model(io.load(path).model, feeds), strict=True
    ):
        np.testing.assert_array_equal(ref, out)


# --- outputs are regular files --------------------------------------------------------------


def _make_node(path: Path, kind: str, pointee: Path) -> None:
    """Create ``path`` as a FIFO, a symbolic link (to ``pointee``), a dangling link or a folder."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        pointee.write_bytes(b"the file the link points to")
        path.symlink_to(pointee)
    elif kind == "dangling_symlink":
        path.symlink_to(pointee)
    else:
        path.mkdir()


def _node_kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISLNK, "link"), (stat.S_ISDIR, "dir")):
        if test(mode):
            return kind
    return "other"


_KIND_AFTER = {"fifo": "fifo", "symlink": "link", "dangling_symlink": "link", "folder": "dir"}
_KIND_MESSAGE = {
    "fifo": "is a FIFO, not a regular file",
    "symlink": "is a symbolic link",
    "dangling_symlink": "is a symbolic link",
    "folder": "is a folder",
}


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling_symlink", "folder"])
def test_save_never_replaces_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """The atomic rename would replace a FIFO (or /dev/null) or a link with a regular file."""
    model = io.load(small_proto()).model
    target = tmp_path / "o.onnx"
    pointee = tmp_path / "elsewhere.onnx"
    _make_node(target, kind, pointee)
    with pytest.raises(UserInputError, match=_KIND_MESSAGE[kind]):
        io.save(model, target)
    assert _node_kind(target) == _KIND_AFTER[kind]
    if kind == "symlink":  # not written through either
        assert pointee.read_bytes() == b"the file the link points to"
    if kind == "dangling_symlink":
        assert not pointee.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_save_never_replaces_a_data_file_that_is_not_regular(tmp_path: Path, kind: str) -> None:
    model = io.load(small_proto(1024)).model
    target = tmp_path / "o.onnx"
    data = tmp_path / "o.onnx.data"
    pointee = tmp_path / "weights.bin"
    _make_node(data, kind, pointee)
    with pytest.raises(UserInputError, match=_KIND_MESSAGE[kind]):
        io.save(model, target, external_data=True)
    assert _node_kind(data) == _KIND_AFTER[kind]
    assert not target.exists()
    if kind == "symlink":
        assert pointee.read_bytes() == b"the file the link points to"
    assert _leftovers(tmp_path) == []
    # An inline save does not touch OUT.data, so whatever it is does not matter.
    io.save(model, target, external_data=False)
    assert onnx.load(str(target)).graph.initializer
    assert _node_kind(data) == _KIND_AFTER[kind]


def test_cli_refuses_a_fifo_output_before_running(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(), path)
    fifo = tmp_path / "o.onnx"
    os.mkfifo(fifo)
    code, out, err = run_cli(["optimize", str(path), "-o", str(fifo)], capsys)
    assert code == 2, err
    assert "is a FIFO, not a regular file" in err
    assert len(err.strip().splitlines()) == 1, err
    assert "passes" not in out  # refused before the pipeline ran
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cli_in_place_refuses_a_symlinked_input(tmp_path: Path, capsys) -> None:
    real = tmp_path / "real.onnx"
    onnx.save_model(small_proto(), real)
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    before = sha(real)
    code, _, err = run_cli(["optimize", str(link), "--in-place"], capsys)
    assert code == 2 and "is a symbolic link" in err, err
    assert link.is_symlink() and sha(real) == before


# Runs graphopt's CLI in a child process with os.replace/os.rename/os.unlink guarded: if a
# regression ever tried to replace /dev/null, the guard fails the run (exit 3) instead of
# letting a root test run destroy the machine's /dev/null.
_DEVICE_GUARD = """
import os, stat, sys

def _guarded(real):
    def call(*args, **kwargs):
        target = args[-1] if real is not os.unlink else args[0]
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            mode = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise RuntimeError(f"test guard: refusing to replace the device {target}")
        return real(*args, **kwargs)
    return call

os.replace, os.rename, os.unlink = (_guarded(f) for f in (os.replace, os.rename, os.unlink))
from graphopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_console_output_to_dev_null_is_refused_and_dev_null_survives(tmp_path: Path) -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null is broken before the test"
    path = tmp_path / "m.onnx"
    onnx.save_model(small_proto(), path)
    proc = subprocess.run(
        [sys.executable, "-c", _DEVICE_GUARD, "optimize", str(path), "-o", "/dev/null"],
        capture_output=True,
        text=True,
        env={**os.environ, "GRAPHOPT_DEBUG": ""},
        timeout=300,
    )
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null was replaced"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "graphopt: error: /dev/null: is a character device, not a regular file; outputs are "
        "written to regular files only"
    )
    assert not list(Path("/dev").glob(".null.*.tmp"))  # no temporary folder left in /dev


# --- corrupt string fields and attributes ---------------------------------------------------


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_load_refuses_strings_that_are_not_utf8(tmp_path: Path, field: str) -> None:
    """protobuf hands such strings to Python as bytes; they used to fail much later."""
    data = flip_in_strings(text_rich_bytes(), 7, 1, field, mode="invalid")
    with pytest.raises(UserInputError, match="is not valid UTF-8"):
        io.load(data)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: .*is not valid UTF-8"):
        io.load(path)


@pytest.mark.parametrize("command", ["optimize", "inspect", "analyze"])
def test_cli_non_utf8_doc_string_is_bad_input(tmp_path: Path, capsys, command: str) -> None:
    # The reported case: it loaded, then optimize died in onnx-ir's serializer (exit 3).
    path = tmp_path / "m.onnx"
    path.write_bytes(flip_in_strings(text_rich_bytes(), 0, 1, "ModelProto.doc_string", "invalid"))
    args = [command, str(path)] + (
        ["-o", str(tmp_path / "o.onnx")] if command == "optimize" else []
    )
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith(f"graphopt: error: {path}: ModelProto.doc_string b'")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_load_refuses_an_attribute_without_type(tmp_path: Path) -> None:
    proto = text_rich_model()
    proto.graph.node[0].attribute.append(helper.make_attribute("strides", [1, 1]))
    proto.graph.node[0].attribute[-1].type = onnx.AttributeProto.UNDEFINED
    with pytest.raises(UserInputError, match="node 'conv' attribute 'strides' has no type"):
        io.load(proto.SerializeToString())


def test_string_attributes_text_for_standard_ops_bytes_for_custom_ones(tmp_path: Path) -> None:
    proto = text_rich_model()
    proto.graph.node[0].attribute[0].s = b"SAME\xffUPPER"  # Conv auto_pad
    with pytest.raises(UserInputError, match=r"'auto_pad': string value .* is not valid UTF-8"):
        io.load(proto.SerializeToString())
    # A custom op may keep a binary blob there (ORT's EPContext does): kept byte for byte.
    proto = text_rich_model()
    blob = helper.make_node("Blob", ["y"], ["z"], domain="com.vendor", payload=b"\xff\x00bin")
    proto.graph.node.append(blob)
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("com.vendor", 1))
    path = io.save(io.load(proto.SerializeToString()).model, tmp_path / "o.onnx")
    (saved,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Blob"]
    assert saved.attribute[0].s == b"\xff\x00bin"


def test_unreadable_graph_names_the_cause() -> None:
    proto = text_rich_model()
    proto.graph.node[-1].output[0] = "i"  # redeclares the If's output
    with pytest.raises(UserInputError, match="ValueError: Output 'i' is redeclared"):
        io.load(proto.SerializeToString())


def _conv_with_bad_pads(tmp_path: Path) -> Path:
    proto = text_rich_model()
    del proto.graph.node[0].attribute[:]
    proto.graph.node[0].attribute.append(helper.make_attribute("pads", [1, 1, 1]))
    path = tmp_path / "bad.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_a_crash_on_an_invalid_model_is_bad_input(tmp_path: Path, capsys, monkeypatch) -> None:
    """Whichever stage trips over a corrupt file, the CLI blames the file (exit 2), not itself."""
    import graphopt.analysis.summary as summary

    def crash(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(summary, "summarize", crash)
    monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)
    bad = _conv_with_bad_pads(tmp_path)
    code, _, err = run_cli(["inspect", str(bad)], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "not a valid ONNX model (onnx checker:" in err and "pads has incorrect size" in err
    assert "graphopt failed on it with IndexError: list index out of range" in err
    # The same crash on a valid model is graphopt's bug: still an internal error.
    good = tmp_path / "good.onnx"
    good.write_bytes(text_rich_bytes())
    code, _, err = run_cli(["inspect", str(good)], capsys)
    assert code == 3 and "internal error: IndexError" in err, err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("other_thread", [False, True], ids=["one-thread", "other-thread"])
def test_sigterm_as_the_temp_folder_is_created_leaves_no_litter(
    tmp_path, monkeypatch, other_thread
) -> None:
    """The CLI turns SIGTERM into KeyboardInterrupt; one arriving just after the temporary
    folder is created (before save holds its name) is held back until the ``try`` that removes
    the folder owns it. With another thread alive (ORT's pools, pytest-xdist's I/O thread) the
    kernel may hand the signal to that thread, so masking it on the main thread is not enough."""
    import signal
    import tempfile
    import threading
    import time

    model = io.load(small_proto()).model
    real_mkdtemp = tempfile.mkdtemp

    def interrupted(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # time for another thread to take it: Python then runs the handler here
        return folder

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    stop = threading.Event()
    idle = threading.Thread(target=stop.wait, daemon=True)
    if other_thread:
        idle.start()
    monkeypatch.setattr(tempfile, "mkdtemp", interrupted)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            io.save(model, tmp_path / "m.onnx")
        assert signal.getsignal(signal.SIGTERM) is raise_interrupt  # the caller's is back
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signals_held_during_save_are_delivered_after_sigterm_first() -> None:
    """Both held: SIGTERM's handler runs before SIGINT's KeyboardInterrupt can pre-empt it
    (SIGTERM's default ends the process, which must not be lost), and both handlers are
    back afterwards."""
    import signal

    seen: list[str] = []

    def on_term(signum, frame):
        seen.append("term")

    def on_int(signum, frame):
        seen.append("int")
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, on_int)
    try:
        with pytest.raises(KeyboardInterrupt), io._signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # held
        assert seen == ["term", "int"]
        assert signal.getsignal(signal.SIGTERM) is on_term
        assert signal.getsignal(signal.SIGINT) is on_int
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_an_input_also_listed_as_a_bare_output_keeps_its_declared_shape() -> None:
    """onnx-ir reads an input listed among the outputs as one value and applies the output
    entry last: a bare entry (no type) erased the input's ``[N, 4]``, and every command then
    said the input had no declared shape."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["o"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, ["N", 4]),
            onnx.ValueInfoProto(name="x"),
        ],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (x,) = io.load(proto).model.graph.inputs
    assert x.dtype == ir.DataType.FLOAT
    assert [d if isinstance(d, int) else d.value for d in x.shape] == ["N", 4]


def test_save_inlines_small_external_tensors_while_views_of_them_live(tmp_path: Path) -> None:
    """onnx-ir's writer inlines external initializers at or under the threshold and closes
    their file maps: with an array view of one alive (a pass read it), that raised
    BufferError, exit 3 on a BERT export whose 1 KiB position_ids sat in external data."""
    source = save_external(small_proto(256), tmp_path / "m.onnx")  # w: 1024 bytes, b: 64
    model = io.load(source).model
    view = model.graph.initializers["w"].const_value.numpy()  # a view of the file map
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = io.save(model, out_dir / "o.onnx", external_data=True)
    saved = onnx.load(str(out))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    np.testing.assert_array_equal(weights["w"], view)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)


def test_in_place_names_the_input_data_file_it_no_longer_reads(tmp_path: Path, capsys) -> None:
    """--in-place writes NAME.onnx.data: an input whose data file had another name left it
    behind, unread, without a word (doubling a large model's disk use)."""
    path = tmp_path / "m.onnx"
    onnx.save_model(
        small_proto(1024),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    code, out, err = run_cli(["optimize", str(path), "--in-place"], capsys)
    assert code == 0, err
    assert "--in-place: the input's external data (weights.bin, " in out
    assert "remove it once no other model uses it" in out
    assert (tmp_path / "weights.bin").exists()  # left alone: another model may share it
    # Data under the name graphopt writes is replaced, not left behind: no note.
    code, out, err = run_cli(["optimize", str(path), "--in-place"], capsys)
    assert code == 0, err
    assert "--in-place: the input's external data" not in out
