"""The ``quantize`` pass: options in, one mode's function out.

Kept small on purpose: importing it (every run registers every pass) must not load the
numerics that only a quantization run needs. Each mode is a function
``(model, settings, calib, context) -> QuantRecord`` that rewrites ``model`` in place; the
mode table is :data:`~graphopt.passes.quantization.settings.MODES`. What the pass refuses
of a model, before and after its mode runs, is in :mod:`.quantize_checks`.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.passes.compensation import COMPENSATION_OPTION
from graphopt.passes.quantization.quantize_checks import (
    check_exclude,
    check_tensorrt_form,
    quiet_float_errors,
    refuse_non_finite,
    refuse_nothing_to_quantize,
    stored_tensors,
    weighted_in_subgraphs,
)
from graphopt.passes.quantization.settings import (
    ACTIVATION_TYPES,
    BLOCK_SIZES,
    CALIB_METHODS,
    INT4_METHODS,
    INT8_MODES,
    INT8_WEIGHT_METHODS,
    MODES,
    QUANT_FORMATS,
    QuantSettings,
    parse_mode,
    parse_patterns,
)
from graphopt.registry import GraphPass, PassOption, Stage, register

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet
    from graphopt.passes.quantization.record import QuantRecord, TypeChange

# Modes whose mixed-precision search runs the mode again per candidate set (mode_search;
# int8 and int8-dynamic search inside their own functions; the others' target is checked).
SEARCHED_MODES = frozenset({"int4-weight"})
# Modes that cannot run without calibration data: activation ranges come from it.
NEEDS_CALIBRATION = frozenset({"int8", "fp8"})
# Modes whose result rounds activations at run time (see QuantRecord.exact_tolerance_after):
# int8 and fp8 quantize them; fp16/bf16 round every op's output, so an exact rewrite that
# changes where the rounding happens (Gemm -> MatMul + Add on GPT-2 fp16: 2.5e-4) moves the
# outputs by a fraction of the model's own error against the original.
ROUNDS_AT_RUN_TIME = frozenset({"int8", "int8-dynamic", "fp8", "fp16", "bf16"})


@register
class QuantizePass(GraphPass):
    """Lower weights and activations to INT8/INT4/FP16/BF16/FP8 where the runtime gains (lossy)."""

    name = "quantize"
    exact = False
    stage = Stage.QUANTIZE
    handles_subgraphs = False
    flag = "--quantize"
    flag_metavar = "|".join(MODES)
    flag_help = (
        "quantize: int8 (static, needs --calib), int8-dynamic (MatMul/Gemm), int4-weight, "
        "fp16, bf16, fp8 (E4M3 Q/DQ, opset >= 19)"
    )
    options = (
        PassOption("mode", str, "", "quantization mode", choices=tuple(MODES)),
        CALIB_OPTION,
        PassOption(
            "calib_method",
            str,
            None,
            "activation ranges: auto (per tensor, the method whose consumer output error is "
            "lowest) is the default",
            flag="--calib-method",
            choices=CALIB_METHODS,
        ),
        PassOption(
            "quant_format",
            str,
            None,
            "qdq (portable, what TensorRT reads; default) or qoperator (QLinear*, ORT only)",
            flag="--quant-format",
            choices=QUANT_FORMATS,
        ),
        PassOption(
            "activation_type",
            str,
            None,
            "int8 activation type (default: s8 portable; --target ort: from the CPU's rule "
            "table in graphopt/passes/quantization/cpu_rules.py)",
            flag="--activation-type",
            choices=ACTIVATION_TYPES,
        ),
        PassOption("per_channel", bool, True, "per-output-channel weight scales"),
        PassOption(
            "exclude",
            str,
            "",
            "keep these in float: op types or node-name globs, comma-separated "
            "(for fp16/bf16: the keep-in-fp32 list)",
            flag="--exclude",
            metavar="PATTERNS",
        ),
        PassOption(
            "max_error",
            float,
            None,
            "int8/int8-dynamic: keep the most sensitive layers in float until the max "
            "relative error is <= E (the worst of held-out and calibration samples); other "
            "modes: checked on the model written (missed: exit 1)",
            flag="--max-error",
            metavar="E",
        ),
        PassOption(
            "min_cosine",
            float,
            None,
            "mixed precision: ... until the mean output cosine is >= C (held-out and "
            "calibration samples)",
            flag="--min-cosine",
            metavar="C",
        ),
        PassOption(
            "min_agreement",
            float,
            None,
            "mixed precision: ... until the argmax agreement along the last axis (a "
            "classifier's or CTC decoder's prediction) is >= A (held-out and calibration "
            "samples; needs 1/(1-A) held-out positions)",
            flag="--min-agreement",
            metavar="A",
        ),
        PassOption(
            "smoothquant",
            float,
            None,
            "SmoothQuant migration strength alpha for MatMul inputs (0 = off; default: 0.5 "
            "for int8 on models with LayerNorm-fed MatMuls, else off)",
            flag="--smoothquant",
            metavar="ALPHA",
            bounds=(0.0, 1.0),
        ),
        PassOption(
            "equalize",
            bool,
            None,
            "cross-layer equalization and bias absorption before int8 (default: on for "
            "models with depthwise convolutions)",
            flag="--equalize",
            metavar="true|false",
        ),
        PassOption(
            "bias_correction",
            bool,
            None,
            "correct the bias of quantized layers for their mean output shift (default: on "
            "with a --calib file)",
            flag="--bias-correction",
            metavar="true|false",
        ),
        PassOption(
            "block_size",
            int,
            32,
            "int4-weight block size",
            flag="--block-size",
            metavar="|".join(map(str, BLOCK_SIZES)),
        ),
        PassOption(
            "int4_method",
            str,
            None,
            "int4-weight rounding: rtn, gptq (error feedback) or awq (activation-aware "
            "scales); default gptq with a --calib file, else rtn",
            flag="--int4-method",
            choices=INT4_METHODS,
        ),
        PassOption(
            "int8_weights",
            str,
            None,
            "int8 weight rounding: rtn (round to nearest) or gptq (error feedback through "
            "the layer input's Gram matrix, same scales); int8 and int8-dynamic; default gptq "
            "with a --calib file, else rtn",
            flag="--int8-weights",
            choices=INT8_WEIGHT_METHODS,
        ),
        PassOption(
            "int4_asymmetric",
            bool,
            False,
            "int4 blocks with zero points (asymmetric)",
            flag="--int4-asymmetric",
            metavar="true|false",
        ),
        PassOption(
            "quantize_embeddings",
            bool,
            False,
            "also quantize embedding tables (Gather on a weight) in int4-weight",
            flag="--quantize-embeddings",
            metavar="true|false",
        ),
        PassOption(
            "autotune",
            bool,
            False,
            "--target ort: time the int8 candidates on this machine and keep the fastest "
            "(the choice is recorded in the output's metadata)",
            flag="--autotune",
            metavar="true|false",
        ),
        COMPENSATION_OPTION,
        HOLDOUT_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--quantize int8`` (or the API's ``quantize=``) as this pass's options."""
        return {"mode": parse_mode(text)}

    # Set by resolved(): why --compensation does nothing here (pruning's bias/lsq), or "".
    _compensation_note = ""

    def rewrite(self, model: ir.Model) -> int:
        settings = self.resolved()
        refuse_nothing_to_quantize(model, settings.mode, settings.quantize_embeddings)
        # --exclude names the user's model: the nodes it was given before the exact passes
        # fused and renamed them (analysis.origins), unnamed ones as that model lists them.
        import dataclasses

        from graphopt.analysis.origins import origin_map
        from graphopt.passes.quantization.layer_names import name_unnamed

        given = self.context.original_nodes
        name_unnamed(model, given)
        if given is not None:
            settings = dataclasses.replace(settings, origins=origin_map(model, given))
        exclude_notes = check_exclude(model, settings, given)
        calib = self._calibration(model, settings)
        module_name, _, function_name = MODES[settings.mode].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        original = None
        if settings.compensation:
            from graphopt.passes.compensation.quantized import prepare

            original = prepare(model, settings)
        start = time.perf_counter()
        stored_before = stored_tensors(model)
        # Overflow in the statistics is refused below, in one line (refuse_non_finite), not
        # in numpy's warnings on the way there.
        with quiet_float_errors():
            if settings.autotune and settings.mode == "int8" and settings.target == "ort":
                from graphopt.passes.quantization.autotune import autotune

                assert calib is not None  # int8 needs calibration (checked above)
                record = autotune(model, settings, calib, self.context, function)
            elif settings.mixed_precision and settings.mode in SEARCHED_MODES:
                from graphopt.passes.quantization.mode_search import quantize_searched

                record = quantize_searched(model, settings, calib, self.context, function)
            else:
                record = function(model, settings, calib, self.context)
            if not record.quantized:
                # Every layer stayed float: the model would come back as it was given
                # (README: refused, not written), also where a mixed-precision target chose
                # that (the refusal says the target is why).
                raise UserInputError(record.unchanged_refusal())
            if settings.autotune and not any("--autotune" in n for n in record.notes):
                record.notes.append(
                    "--autotune had no effect: it times static int8 candidates for "
                    "--target ort only"
                )
        # One line per tensor, whichever mode listed it twice (a weight stored at two axes).
        record.type_changes = _float_copies_kept(model, _unique_changes(record.type_changes))
        record.notes.extend(_unused_option_notes(self.given, settings.mode))
        record.notes.extend(exclude_notes)
        kept = record.kept_float_note()
        if kept:
            record.notes.append(kept)
        inside = weighted_in_subgraphs(model)
        if inside:
            record.notes.append(
                f"{inside} Conv/Gemm/MatMul node(s) inside If/Loop/Scan branches left in float: "
                "quantize rewrites the main graph only"
            )
        if not settings.autotune:  # --autotune records its own choice
            _record_cpu_rule_choice(model, settings, record.notes)
        if settings.mode not in ("fp16", "bf16"):  # these only cast: an inf stays an inf
            refuse_non_finite(model, stored_before, calib)
        if original is not None:
            from graphopt.passes.compensation.quantized import compensate_quantized

            assert calib is not None  # required with --compensation (resolved())
            compensate_quantized(model, original, record, calib, settings, self.context)
            _count_paths(model, record)
        elif self._compensation_note:
            record.notes.append(self._compensation_note)
        if settings.mixed_precision and settings.mode not in (*INT8_MODES, *SEARCHED_MODES):
            # No search in these modes: the target is checked on what is written (with
            # EoRA's paths, when added), never ignored.
            from graphopt.passes.quantization import mixed_precision as mp

            mp.judge_written(record, mp.Target.from_settings(settings))
        if record.fidelity:
            # Measured against the run's original when a lossy pass before this one
            # changed the model: the title says which passes' change it includes.
            record.fidelity_source = self.context.fidelity_source(record.fidelity_source)
        if record.curve and self.context.reference_model is not None:
            record.notes.append(
                "mixed precision: target and curve measured against the run's original "
                f"(includes {', '.join(self.context.reference_includes)})"
            )
        record.seconds = time.perf_counter() - start
        record.settings = settings.to_json()
        if settings.mode in ROUNDS_AT_RUN_TIME and record.fidelity:
            # Its own measured error (ORT optimizations off: the Q/DQ reference numerics
            # verification also runs): against the original, or in a chained run against the
            # model it was given (the earlier passes' error would loosen the check).
            from graphopt.passes.quantization.record import float_max_rel

            first = next(iter(record.fidelity.values()))
            own = record.own_max_rel
            record.exact_tolerance_after = float_max_rel(first) if own is None else own
            if own is None:
                record.exact_tolerances_after = {
                    f.output: f.max_rel for f in first if f.equal_share is None
                }
        record.summary = record.headline()
        self.context.details["quantize"] = record
        return record.quantized

    def resolved(self) -> QuantSettings:
        """The settings of this run: checked, with the documented defaults filled in."""
        s = self.settings
        if not s["mode"]:
            raise UserInputError("quantize: give a mode, e.g. --quantize int8")
        mode = parse_mode(s["mode"])
        for name in ("max_error", "min_cosine", "min_agreement"):
            value = s[name]
            limit = 1e9 if name == "max_error" else 1.0
            if value is not None and not (0.0 < value <= limit):
                raise UserInputError(f"quantize: --{name.replace('_', '-')} {value}: out of range")
        if s["block_size"] not in BLOCK_SIZES:
            raise UserInputError(
                f"quantize: --block-size {s['block_size']}: expected one of "
                f"{', '.join(map(str, BLOCK_SIZES))}"
            )
        from graphopt.passes.compensation.eora import parse_compensation, require_calibration

        rank, self._compensation_note = parse_compensation(s["compensation"], "quantize")
        require_calibration(rank, s["calib"], "quantize")
        if rank and mode not in ("int8", "int4-weight"):
            raise UserInputError(
                f"quantize {mode}: --compensation eora works with --quantize int8 and "
                "int4-weight only"
            )
        defaulted = [k for k in _DEFAULTED if s[k] is None]
        has_file = bool(s["calib"]) and s["calib"] != "random"
        target = self.context.target
        if target == "tensorrt":
            check_tensorrt_form(mode, s["quant_format"], s["activation_type"], s["int4_asymmetric"])
        return QuantSettings(
            mode=mode,
            target=target,
            calib=s["calib"],
            calib_method=s["calib_method"] or "auto",
            quant_format=s["quant_format"] or "qdq",
            activation_type=s["activation_type"] or default_activation_type(target),
            per_channel=s["per_channel"],
            exclude=_exclude_patterns(s["exclude"], "exclude" in self.given),
            max_error=s["max_error"],
            min_cosine=s["min_cosine"],
            min_agreement=s["min_agreement"],
            # None: the mode decides (smoothquant: only where LayerNorm feeds MatMuls).
            smoothquant=-1.0 if s["smoothquant"] is None else s["smoothquant"],
            equalize=bool(s["equalize"]) if s["equalize"] is not None else False,
            bias_correction=has_file if s["bias_correction"] is None else s["bias_correction"],
            block_size=s["block_size"],
            int4_method=s["int4_method"] or ("gptq" if has_file else "rtn"),
            int8_weights=s["int8_weights"]
            or ("gptq" if has_file and mode in INT8_MODES else "rtn"),
            int4_asymmetric=s["int4_asymmetric"],
            quantize_embeddings=s["quantize_embeddings"],
            autotune=s["autotune"],
            holdout=s["holdout"],
            compensation=rank,
            defaulted=tuple(defaulted),
        )

    def _calibration(self, model: ir.Model, settings: QuantSettings) -> CalibrationSet | None:
        source = settings.calib
        if not source:
            if settings.mode in NEEDS_CALIBRATION:
                raise UserInputError(
                    f"quantize {settings.mode}: activation ranges need calibration data: pass "
                    "--calib FILE.npz (`graphopt calib` builds one from images or text), or "
                    "--calib random to use generated inputs (not recommended)"
                )
            return None
        return calibration_for(
            "quantize", source, model, self.context, "activation ranges were measured"
        )


# Options whose unset value (None) is resolved per run; the report says which were.
_DEFAULTED = (
    "calib_method",
    "quant_format",
    "activation_type",
    "smoothquant",
    "equalize",
    "bias_correction",
    "int4_method",
    "int8_weights",
)


# Options only some modes read (name: flag, those modes). Given to another mode, the report
# says it had no effect: a setting the user chose must not vanish silently. (--autotune has
# its own note: it also needs --target ort; --compensation is refused where it cannot run.
# --min-cosine/--max-error/--min-agreement take every mode: a search in int8 and
# int8-dynamic, a check of the written model in the others.)
_MODE_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "calib_method": ("--calib-method", ("int8",)),
    "quant_format": ("--quant-format", ("int8",)),
    "activation_type": ("--activation-type", INT8_MODES),
    "per_channel": ("per_channel", (*INT8_MODES, "fp8")),
    "smoothquant": ("--smoothquant", INT8_MODES),
    "equalize": ("--equalize", ("int8",)),
    "bias_correction": ("--bias-correction", ("int8",)),
    "int8_weights": ("--int8-weights", INT8_MODES),
    "block_size": ("--block-size", ("int4-weight",)),
    "int4_method": ("--int4-method", ("int4-weight",)),
    "int4_asymmetric": ("--int4-asymmetric", ("int4-weight",)),
    "quantize_embeddings": ("--quantize-embeddings", ("int4-weight",)),
}


def _count_paths(model: ir.Model, record: QuantRecord) -> None:
    """The headline's weights after, counted on the model written: EoRA's float32 paths
    (llama_tiny int4 eora:8: 0.16 MiB) were left out of "weights 2.10 MiB -> 0.74 MiB",
    though the file holds 0.90 MiB; the paths' share is said beside it."""
    from graphopt.passes.quantization.record import weight_bytes

    if not record.weight_bytes_before:
        return
    written = weight_bytes(model)
    record.path_bytes = max(written - record.weight_bytes_after, 0)
    record.weight_bytes_after = written


def _unused_option_notes(given: frozenset[str], mode: str) -> list[str]:
    """A note per given option that ``mode`` does not read."""
    notes = []
    for name in sorted(given & _MODE_OPTIONS.keys()):
        flag, modes = _MODE_OPTIONS[name]
        if mode not in modes:
            where = " and ".join(f"--quantize {m}" for m in modes)
            notes.append(f"{flag} had no effect: it applies to {where} only")
    return notes


def _exclude_patterns(text: str | None, given: bool) -> tuple[str, ...]:
    """``--exclude``'s patterns; given with none in it (``--exclude ''``) is refused: it
    reads as "keep these float" and kept nothing."""
    patterns = parse_patterns(text or "")
    if given and not patterns:
        raise UserInputError(
            f"quantize: --exclude {text!r}: no pattern given (op types or node names, "
            "comma-separated)"
        )
    return patterns


def _float_copies_kept(model: ir.Model, changes: list[TypeChange]) -> list[TypeChange]:
    """Say where a stored tensor listed as changed keeps its float copy too: an op left in
    float also reads it (``w float->int8`` read as if the float ``w`` were gone, while the
    file holds both)."""
    import dataclasses

    kept = []
    for change in changes:
        value = model.graph.initializers.get(change.tensor)
        if (
            value is not None
            and change.before == "float"
            and value.dtype == ir.DataType.FLOAT
            and value.uses()
        ):
            readers = sorted({use.node.name or use.node.op_type for use in value.uses()})
            change = dataclasses.replace(
                change,
                after=f"{change.after} (the float one stays too: read by {', '.join(readers)})",
            )
        kept.append(change)
    return kept


def _unique_changes(changes: list[TypeChange]) -> list[TypeChange]:
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for change in changes:
        key = (change.tensor, change.before, change.after)
        if key not in seen:
            seen.add(key)
            unique.append(change)
    return unique


def _record_cpu_rule_choice(model: ir.Model, settings: QuantSettings, notes: list[str]) -> None:
    """Record the activation type the CPU rule table chose (``--target ort``, none given):
    the same input and options give another file on a CPU of another family, and the file
    must say which choice made it, and how to make it on another machine."""
    if settings.target != "ort" or settings.mode not in INT8_MODES:
        return
    if "activation_type" not in settings.defaulted:
        return
    from graphopt.passes.quantization.cpu_rules import CPU_RULE_KEY, cpu_family, record

    family = cpu_family()
    model.metadata_props[CPU_RULE_KEY] = record(family, settings.activation_type)
    notes.append(
        f"activations {settings.activation_type}: the CPU rule table's choice for this machine "
        f"({family}); --activation-type {settings.activation_type} gives the same file on "
        "any CPU"
    )


def default_activation_type(target: str) -> str:
    """The int8 activation type when none is given: s8 for portable/TensorRT (symmetric, what
    TensorRT accepts); for ``--target ort`` the rule table for this machine's CPU."""
    if target != "ort":
        return "s8"
    from graphopt.passes.quantization.cpu_rules import activation_type_for_this_cpu

    return activation_type_for_this_cpu()
