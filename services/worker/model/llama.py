"""Our torch implementation of the Llama family (Llama, SmolLM, Qwen2, Mistral).

RMSNorm, rotate-half RoPE with optional scaling, grouped-query attention,
SwiGLU, optionally tied embeddings. Numerics follow Hugging Face's
LlamaForCausalLM so that the two can be compared logit for logit.
Q/K/V and gate/up projections are fused into one matmul each: fewer kernel
launches per decode step, same arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.model.args import ModelArgs, RopeScaling
from services.worker.model.kernels import Kernel, Projection, Q4Groups
from services.worker.model.kv_cache import ContiguousKVCache


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of each rotated pair, scaled as the model's metadata says."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "factors":
        return inv_freq / torch.tensor(scaling.freq_factors, dtype=torch.float32, device="cpu")
    if scaling.kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"RoPE scaling {scaling.kind!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_freq_wavelen = s.original_context / s.low_freq_factor
    high_freq_wavelen = s.original_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    args: ModelArgs, max_positions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of every position's angles, [max_positions, head_dim]."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, rope_inv_freq(args).to(device))
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AttentionContext(Protocol):
    """What every layer needs for one forward pass besides the hidden states."""

    # float32 RoPE tables cast to the activations' dtype, [1, 1, T, head_dim].
    cos: torch.Tensor
    sin: torch.Tensor
    # How this pass runs its projections; None: dense in the weights' own dtype.
    kernel: Kernel | None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the chunk's k/v ([1, kv_heads, T, head_dim]) and attend q ([1, heads, T, head_dim])."""
        ...


@dataclasses.dataclass
class ForwardContext:
    """One sequence's chunk over a contiguous cache."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: ContiguousKVCache
    # Cache position of the first token of the chunk.
    start: int
    # None: no mask (one token) or plain causal from position 0.
    mask: torch.Tensor | None
    kernel: Kernel | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.update(layer, k, v, self.start)
        return attention(q, keys, values, self.mask)


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        # Causal from position 0 is the common prefill case and needs no mask tensor.
        is_causal=mask is None and q.shape[2] > 1,
        enable_gqa=q.shape[1] != keys.shape[1],
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, then scale in the activations' dtype (as
        # HF does in a model of that dtype).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        weight = self.weight
        if weight.dtype != x.dtype:
            if x.dtype not in self._cast:
                self._cast[x.dtype] = weight.detach().to(x.dtype)
            weight = self._cast[x.dtype]
        return weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Projection(args.hidden_size, q_size + 2 * kv_size, bias=args.attention_bias)
        self.o_proj = Projection(q_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x, ctx.kernel).split(self.split, dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        out = ctx.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1), ctx.kernel)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = Projection(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = Projection(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernel: Kernel | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, kernel).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, kernel)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.kernel)


class LlamaModel(nn.Module):
    """Token ids + positions + KV cache in, hidden states out; `compute_logits` is separate
    so that a prefill only pays the vocabulary projection for the positions it samples."""

    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        self.args = args
        # Uninitialised: weights are always loaded (and a random normal_ init even on the meta
        # device costs a second of one-time set-up).
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.hidden_size, _weight=torch.empty(args.vocab_size, args.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_embeddings else Projection(args.hidden_size, args.vocab_size)
        # Plain attributes, not buffers: they stay float32 (as the reference computes them)
        # when the weights move to another dtype. `place_rope` moves them to a device.
        self.rope_cos, self.rope_sin = rope_tables(args, max_positions, torch.device("cpu"))

    def place_rope(self, device: torch.device) -> None:
        self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: ContiguousKVCache,
        start: int,
        kernel: Kernel | None = None,
    ) -> torch.Tensor:
        """input_ids/positions: [1, T]; the tokens sit at cache positions start..start+T."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = chunk_mask(input_ids.shape[1], start, x.device)
        return self.run_layers(x, ForwardContext(cos, sin, cache, start, mask, kernel))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of `positions` ([1, T]) as [1, 1, T, head_dim] in `dtype`."""
        # Tables are float32 (as HF computes them) and cast once per step to the model dtype.
        return (
            self.rope_cos[positions].unsqueeze(1).to(dtype),
            self.rope_sin[positions].unsqueeze(1).to(dtype),
        )

    def run_layers(
        self, x: torch.Tensor, ctx: AttentionContext, before_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Embedded tokens [1, T, hidden] through every layer and the final norm.

        `before_layer(i)` runs before layer i; it may raise to give the pass up.
        """
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            x = layer(x, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype whatever kernel ran the layers: a bfloat16 head rounds
        logits near 25 to steps of 0.125 and turns near-ties into exact ones, which argmax
        breaks by token id ("The capital" became "L'Étoile" that way). A float32 head at one
        row also cost no more than a bfloat16 one where it was timed."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def pack(self, kernels: frozenset[Kernel], *, quantize: bool = False) -> None:
        """Give every layer's projections the formats these kernels run, and only those
        (`quantize`: see `Projection.pack`); the vocabulary head stays in the model's dtype
        (`compute_logits`)."""
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, Projection):
                    module.pack(kernels, quantize=quantize)

    def drop_originals(self) -> None:
        for module in self.modules():
            if isinstance(module, Projection):
                module.drop_original()

    def load_hf_tensors(
        self, tensors: dict[str, torch.Tensor], q4: dict[str, Q4Groups] | None = None
    ) -> None:
        """Copy Hugging Face-named tensors in, fusing Q/K/V and gate/up (and their 4-bit originals)."""
        own = dict(tensors)
        q4 = dict(q4 or {})
        fused: dict[str, Q4Groups] = {}
        for i in range(self.args.num_layers):
            p = f"layers.{i}."
            groups = {
                f"{p}self_attn.qkv_proj": [f"{p}self_attn.{n}_proj" for n in ("q", "k", "v")],
                f"{p}mlp.gate_up_proj": [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"],
            }
            for target, sources in groups.items():
                for kind in ("weight", "bias"):
                    parts = [own.pop(f"{n}.{kind}", None) for n in sources]
                    if all(t is not None for t in parts):
                        own[f"{target}.{kind}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
                originals = [q4.pop(f"{n}.weight", None) for n in sources]
                if all(g is not None for g in originals):
                    fused[target] = Q4Groups.cat(originals)  # type: ignore[arg-type]
            for name in (f"{p}self_attn.o_proj", f"{p}mlp.down_proj"):
                if (original := q4.pop(f"{name}.weight", None)) is not None:
                    fused[name] = original
        if self.lm_head is None:
            own.pop("lm_head.weight", None)
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, original in fused.items():
            projection = self.get_submodule(name)
            assert isinstance(projection, Projection)
            projection.q4 = original


def chunk_mask(length: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask for a chunk that follows `start` cached positions; None where SDPA needs none."""
    if length == 1 or start == 0:
        return None
    query = torch.arange(start, start + length, device=device).unsqueeze(1)
    key = torch.arange(start + length, device=device).unsqueeze(0)
    return key <= query
