"""The model on a tiny random config: the KV cache and chunk masks give the same numbers
as one full causal pass; RoPE scaling and llama.cpp's Q/K permutation are handled."""

from __future__ import annotations

import pytest
import torch

from services.worker.model.args import ModelArgs, RopeScaling
from services.worker.model.kv_cache import ContiguousKVCache
from services.worker.model.llama import LlamaModel, rope_inv_freq
from services.worker.model.loader import _unpermute_rope_rows

ARGS = ModelArgs(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=64,
    tie_embeddings=True,
)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.manual_seed(0)
    m = LlamaModel(ARGS, max_positions=64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def run(model: LlamaModel, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits of every position, feeding `ids` in chunks of the given sizes."""
    cache = ContiguousKVCache(ARGS, 64, torch.float32, torch.device("cpu"))
    out, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            chunk = torch.tensor([ids[start : start + size]])
            positions = torch.arange(start, start + size).unsqueeze(0)
            out.append(model.compute_logits(model(chunk, positions, cache, start))[0])
            start += size
    return torch.cat(out)


IDS = [5, 9, 33, 2, 17, 40, 8, 1, 63, 22, 11, 7]


def test_token_by_token_decode_matches_one_pass(model: LlamaModel) -> None:
    full = run(model, IDS, [len(IDS)])
    stepwise = run(model, IDS, [1] * len(IDS))
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_matches_one_pass(model: LlamaModel) -> None:
    full = run(model, IDS, [len(IDS)])
    chunked = run(model, IDS, [5, 4, 1, 2])
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_future_tokens_do_not_leak_into_the_past(model: LlamaModel) -> None:
    a = run(model, [*IDS[:6], 1, 1], [8])
    b = run(model, [*IDS[:6], 50, 60], [8])
    torch.testing.assert_close(a[:6], b[:6])
    assert not torch.allclose(a[6:], b[6:])


def test_unpermute_undoes_llama_cpp_permutation() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(4 * 8, 5)
    assert torch.equal(_unpermute_rope_rows(llama_cpp_permute(w, 4), 4), w)
    assert not torch.equal(llama_cpp_permute(w, 4), w)


def test_rope_scaling_kinds() -> None:
    base = rope_inv_freq(ARGS)
    linear = rope_inv_freq(ModelArgs(**{**ARGS.__dict__, "rope_scaling": RopeScaling("linear", factor=4.0)}))
    torch.testing.assert_close(linear, base / 4)
    factors = tuple(float(i + 1) for i in range(4))
    per_freq = rope_inv_freq(
        ModelArgs(**{**ARGS.__dict__, "rope_scaling": RopeScaling("factors", freq_factors=factors)})
    )
    torch.testing.assert_close(per_freq, base / torch.tensor(factors))


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    ours = rope_inv_freq(
        ModelArgs(
            **{
                **ARGS.__dict__,
                "head_dim": 64,
                "rope_theta": 500000.0,
                "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
            }
        )
    )
    config = LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **rope},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    torch.testing.assert_close(ours, theirs)
    base = rope_inv_freq(ModelArgs(**{**ARGS.__dict__, "head_dim": 64, "rope_theta": 500000.0}))
    assert ours[0] == base[0] and ours[-1] < base[-1]  # high frequencies kept, low ones stretched
