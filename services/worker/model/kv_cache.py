"""A contiguous key/value cache for one sequence.

The model only calls `update(layer, k, v, start)` and gets back everything
attended to so far, so a paged cache can later stand in behind the same call.
"""

from __future__ import annotations

import torch

from services.worker.model.args import ModelArgs


class ContiguousKVCache:
    """Keys and values of one sequence, preallocated up to `max_len` positions."""

    def __init__(self, args: ModelArgs, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (args.num_layers, 1, args.num_kv_heads, max_len, args.head_dim)
        # torch.empty: positions are always written before they are read.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([1, kv_heads, T, head_dim]) at positions start.. and return positions 0..start+T."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
