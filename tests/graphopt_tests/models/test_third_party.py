"""Third-party model files through every command: exit 0 or a one-line reason, never an
internal error (exit 3) or a traceback; and where ONNX Runtime runs the model at the sizes
graphopt finds, verified (exit 0), not "written but not verified" (exit 4).

The files are what users bring, not graphopt's exports: silero-vad's six ONNX files
(recurrent state ``[2, B, 128]``, a scalar sample-rate input, the model inside If branches
on that rate, unnamed dims, float16, a reflect Pad and an STFT Conv that need 192 to 1023
samples), PP-OCR's recognizer (CTC head, paddle2onnx's ``?`` dims), and that recognizer
quantized by ONNX Runtime's own tools (dynamic: MatMulInteger/DynamicQuantizeLinear; static:
QDQ). Before graphopt enlarged sizes the model rejects, the silero files ended in exit 4
(16 generated samples cannot be reflect-padded by 64) and ``--prune --calib random`` on two
of them in exit 3.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.cli import main
from graphopt_tests.helpers import import_or_skip
from graphopt_tests.models.cases import require

COMMANDS = {
    "optimize": ["optimize"],
    "analyze": ["analyze"],
    "prune": ["optimize", "--prune", "flops=0.3", "--calib", "random"],
    "target-ort": ["optimize", "--target", "ort"],
}
# Each silero file runs in under a second per command: all on every test run; the PP-OCR
# recognizer (11 MB, ~1 min for its three forms) only with the slow tests.
SILERO = [
    "silero_vad",
    "silero_vad_half",
    "silero_vad_16k_op15",
    "silero_vad_op18_ifless",
    "silero_vad_16k_sequence",
    "silero_vad_openvino_16k",
]
# Files whose default sizes ORT rejects: the report must say what was enlarged.
ENLARGED = {"silero_vad", "silero_vad_half", "silero_vad_16k_op15", "silero_vad_op18_ifless"}
# Every weight of these lies inside If branches (not analysed): a prune run is refused, as it
# would hand the model back unchanged (exit 2, one line).
UNPRUNABLE = {"silero_vad", "silero_vad_op18_ifless"}


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _silero(name: str) -> Path:
    """One of silero-vad's ONNX files, found without importing the package (it imports
    torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed (pip install -e '.[torch]' pins 6.2.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.onnx"
    assert path.is_file(), f"silero-vad 6.2.3 ships {path.name}; another version is installed?"
    return path


def _run(source: Path, command: str, tmp_path: Path, capsys) -> tuple[int, str]:
    """Run one command on ``source`` in-process and check the exit contract; (code, text)."""
    args = [*COMMANDS[command][:1], str(source), *COMMANDS[command][1:]]
    if args[0] == "optimize":
        args += ["-o", str(tmp_path / "out.onnx")]
    code = main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    assert code in (0, 1, 2), f"exit {code}: {captured.err}"
    if code in (1, 2):
        # A check that failed or bad input: one line, saying why.
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), captured.err
    return code, " ".join(text.split())  # rich wraps long notes


def _assert_verified(code: int, text: str, command: str) -> None:
    """The model runs in ORT at the sizes found: exit 0, and verification ran."""
    assert code == 0, text
    if command == "analyze":
        return
    assert "not verified" not in text
    if command == "prune":
        assert "exact passes: verified against the original" in text
    else:
        assert "verification passed" in text
    assert "checked at" in text


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", SILERO)
def test_silero(name: str, command: str, tmp_path: Path, capsys) -> None:
    code, text = _run(_silero(name), command, tmp_path, capsys)
    if command == "prune" and name in UNPRUNABLE:
        assert code == 2 and "nothing to prune: no prunable group: weights inside If" in text
        return
    _assert_verified(code, text, command)
    if command != "analyze" and name in ENLARGED:
        # The sizes used, and why: 16 (or 65) samples fail, x4 until ORT runs the model.
        assert "generated inputs enlarged:" in text and "per try until the original" in text


def test_silero_state_batch_is_the_input_batch(tmp_path: Path, capsys) -> None:
    """silero_vad.onnx names no dim: ``state[2, ?, 128]``'s ``?`` is ``input``'s batch,
    at both shapes checked (a state batch of 16 beside an input batch of 1 fails in the
    LSTM)."""
    code, text = _run(_silero("silero_vad"), "optimize", tmp_path, capsys)
    assert code == 0, text
    assert (
        "checked at 2 input shapes: input[0]=1, input[1]=256: input 1x256, state 2x1x128, "
        "sr scalar | input[0]=2, input[1]=224: input 2x224, state 2x2x128, sr scalar"
    ) in text


def test_silero_pruning_checks_at_the_sizes_verification_found(tmp_path: Path, capsys) -> None:
    """Without calibration data the zero-invariance guard runs on generated inputs: at the
    sizes verification enlarged to (16 samples fail in the STFT's reflect Pad), so it is
    judged, and FLOPs are counted where the model runs."""
    source = _silero("silero_vad_half")
    args = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--prune", "flops=0.3"]
    code = main(args)
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0, text
    assert "zero-invariance check passed" in text and "not judged" not in text


@pytest.fixture(scope="module")
def ppocr_rec_files(tmp_path_factory) -> dict[str, Path]:
    """PP-OCR's recognizer, and it quantized by ONNX Runtime: dynamically (MatMulInteger,
    DynamicQuantizeLinear) and statically (QDQ, calibrated on a few random images)."""
    require("ppocr_rec")
    import graphopt.models as models

    quantization = import_or_skip("onnxruntime.quantization", "ORT's quantization tools")
    folder = tmp_path_factory.mktemp("ppocr_rec")
    source = models.get("ppocr_rec")
    # quantize_dynamic quantizes MatMuls whose weight is an initializer; paddle2onnx wrote
    # the weights as Constant nodes.
    proto = onnx.load(source)
    constants = [n for n in proto.graph.node if n.op_type == "Constant" and _tensor_attr(n)]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        proto.graph.initializer.append(tensor)
        proto.graph.node.remove(node)
    plain = folder / "ppocr_rec_init.onnx"
    onnx.save(proto, plain)
    dynamic = folder / "ppocr_rec_dynamic.onnx"
    quantization.quantize_dynamic(
        plain, dynamic, op_types_to_quantize=["MatMul"], weight_type=quantization.QuantType.QInt8
    )
    static = folder / "ppocr_rec_qdq.onnx"
    quantization.quantize_static(
        plain, static, _RandomImages(2), quant_format=quantization.QuantFormat.QDQ
    )
    ops = {path.stem: {n.op_type for n in onnx.load(path).graph.node} for path in (dynamic, static)}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops["ppocr_rec_dynamic"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["ppocr_rec_qdq"]
    return {"ppocr_rec": source, "ppocr_rec_dynamic": dynamic, "ppocr_rec_qdq": static}


def _tensor_attr(node: onnx.NodeProto) -> bool:
    return len(node.attribute) == 1 and node.attribute[0].name == "value"


class _RandomImages:
    """onnxruntime.quantization's CalibrationDataReader protocol: ``count`` random images."""

    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(0)
        self._feeds = iter(
            [{"x": rng.standard_normal((1, 3, 48, 320)).astype(np.float32)} for _ in range(count)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", ["ppocr_rec", "ppocr_rec_dynamic", "ppocr_rec_qdq"])
def test_ppocr_rec_and_quantized(
    name: str, command: str, ppocr_rec_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    code, text = _run(ppocr_rec_files[name], command, tmp_path, capsys)
    if command == "prune" and name == "ppocr_rec_qdq":
        # QDQ leaves no float weight: refused in one line, as the model would come back as is.
        assert code == 2 and "prune flops=0.3: the model is already quantized" in text
        return
    _assert_verified(code, text, command)
    # Integer weights are not pruned, and the run says so rather than failing: the float
    # Convs beside the MatMulIntegers are pruned.
    if command == "prune" and name == "ppocr_rec_dynamic":
        assert "left as they are: quantized (MatMulInteger) weights are not pruned" in text
        assert "pruning flops=0.3:" in text
