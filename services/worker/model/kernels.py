"""Ways to run a linear layer (weight format x activation dtype), and the per-step choice among them.

The fastest way to multiply depends on how many rows a step carries and on the device: reading
4-bit weights wins a single-stream decode, which is bound by memory; a large batch is bound by
arithmetic, where dense float32 (a CPU without bfloat16 units) or bfloat16 (AMX, GPUs) wins.
`Projection` keeps a layer's weights in every format a worker may run; `KernelPlan` says which
one a step of n rows runs, from timings the worker takes at start (`kernel_bench.py`).
"""

from __future__ import annotations

import bisect
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

# GGUF Q4_1 and Q8_0 quantise rows in groups of this many weights.
GROUP = 32

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WEIGHT_FORMATS = ("dense", "int4", "int8")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One way to run every projection of a forward pass."""

    # "dense": weights in `dtype`; "int4": 4-bit in groups of 32 with a scale and a zero each
    # (exactly GGUF's Q4_1); "int8": 8 bits per weight, one scale per output row.
    weights: str
    # What the projections multiply in (their inputs, and dense weights); the residual stream,
    # norms and attention stay in the model's dtype.
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights={self.weights!r}: must be one of {', '.join(WEIGHT_FORMATS)}")

    @property
    def name(self) -> str:
        dtype = _DTYPE_NAMES[self.dtype]
        return dtype if self.weights == "dense" else f"{self.weights}-{dtype}"

    @classmethod
    def parse(cls, name: str) -> Kernel:
        """'fp32', 'bf16', 'int4-bf16', ... back to a Kernel."""
        weights, _, dtype = name.rpartition("-")
        by_name = {v: k for k, v in _DTYPE_NAMES.items()}
        if dtype not in by_name or weights not in ("", "int4", "int8"):
            raise ValueError(f"kernel {name!r}: expected fp32, bf16, fp16, int4-<dtype> or int8-<dtype>")
        return cls(weights or "dense", by_name[dtype])


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Which kernel runs a step, by its number of token rows.

    `bounds[i]` is the most rows `kernels[i]` runs; the last kernel runs everything larger.
    """

    bounds: tuple[int, ...]
    kernels: tuple[Kernel, ...]

    def __post_init__(self) -> None:
        if not self.kernels or len(self.bounds) != len(self.kernels) - 1:
            raise ValueError("a plan needs one kernel more than it has bounds")
        if list(self.bounds) != sorted(set(self.bounds)) or (self.bounds and self.bounds[0] < 1):
            raise ValueError(f"bounds={self.bounds}: must be increasing and >= 1")

    @classmethod
    def single(cls, kernel: Kernel) -> KernelPlan:
        return cls((), (kernel,))

    @classmethod
    def from_fastest(cls, fastest: list[tuple[int, Kernel]]) -> KernelPlan:
        """From (rows, fastest kernel at that many rows), rows increasing: each kernel runs up to
        the last measured size where it won, merged with its neighbours where they agree."""
        bounds: list[int] = []
        kernels: list[Kernel] = []
        for rows, kernel in fastest:
            if kernels and kernels[-1] == kernel:
                bounds[-1] = rows
                continue
            kernels.append(kernel)
            bounds.append(rows)
        return cls(tuple(bounds[:-1]), tuple(kernels))

    def kernel_for(self, rows: int) -> Kernel:
        return self.kernels[bisect.bisect_left(self.bounds, rows)]

    def describe(self) -> str:
        """e.g. 'int4-bf16 <=8 rows, fp32 above': what load reports and `infermesh status` show."""
        if len(self.kernels) == 1:
            return self.kernels[0].name
        parts = [f"{k.name} <={b}" for k, b in zip(self.kernels, self.bounds, strict=False)]
        return ", ".join([*parts, f"{self.kernels[-1].name} above"])


@dataclasses.dataclass(frozen=True)
class Q4Groups:
    """A weight as GGUF's Q4_1 stores it: w = scale * q + min per group of 32 along a row."""

    q: torch.Tensor  # uint8 [out, in], values 0..15
    scale: torch.Tensor  # float32 [out, in / 32]
    min: torch.Tensor  # float32 [out, in / 32]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.q.view(rows, cols // GROUP, GROUP).float()
        return (groups * self.scale.unsqueeze(-1) + self.min.unsqueeze(-1)).view(rows, cols)

    @staticmethod
    def cat(parts: list[Q4Groups]) -> Q4Groups:
        """Row-wise concatenation (fusing Q/K/V or gate/up)."""
        return Q4Groups(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.min for p in parts]),
        )


def int4_available(device: torch.device) -> bool:
    """torch's 4-bit weight-only matmul for the layout packed here exists on CPU only."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_available(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Projection(nn.Module):
    """A linear layer (same `weight`/`bias` names as nn.Linear, so checkpoints load into it) that
    can also hold its weights in other formats and runs the one the step's kernel names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # The 4-bit original, where the file shipped this weight as Q4_1 (set by the loader).
        self.q4: Q4Groups | None = None
        # How each packed kernel runs here: the format actually used (a weight the file did not
        # ship quantised runs dense in the kernel's dtype unless `pack` was told to quantise).
        self._uses: dict[Kernel, str] = {}
        self._dense: dict[torch.dtype, torch.Tensor] = {}
        self._bias: dict[torch.dtype, torch.Tensor] = {}
        self._int4: tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]] | None = None
        self._int8: tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor, kernel: Kernel | None = None) -> torch.Tensor:
        """x in the model's dtype; a kernel of another dtype multiplies in its own and hands the
        result back in the model's, so the residual stream, norms and attention keep the model's
        precision (bfloat16 everywhere would cost several times the error for nothing in speed)."""
        if kernel is None or (kernel.weights == "dense" and kernel.dtype == self.weight.dtype):
            return F.linear(x, self.weight, self.bias)
        uses = self._uses[kernel]
        inputs = x.to(kernel.dtype)
        if uses == "dense":
            weight = self._dense.get(kernel.dtype, self.weight)
            return F.linear(inputs, weight, self._bias.get(kernel.dtype)).to(x.dtype)
        rows = inputs.reshape(-1, x.shape[-1])
        if uses == "int4":
            assert self._int4 is not None
            packed, scale_zeros = self._int4
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, GROUP, scale_zeros[kernel.dtype])
        else:
            assert self._int8 is not None
            weight, scales = self._int8
            out = torch.ops.aten._weight_int8pack_mm(rows, weight, scales[kernel.dtype])
        if self.bias is not None:
            out = out + self._bias[kernel.dtype]
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    def uses(self, kernel: Kernel) -> str:
        """The format `kernel` runs here ("dense", "int4" or "int8")."""
        return self._uses.get(kernel, "dense")

    @torch.no_grad()
    def pack(self, kernels: frozenset[Kernel], *, quantize: bool = False) -> None:
        """Make the formats these kernels run, and only those. A 4-bit kernel uses the original
        groups where the file shipped them; with `quantize` a weight without them is quantised
        here (approximate: it changes the model), without it the weight runs dense instead."""
        self._uses = {}
        for kernel in kernels:
            shipped = kernel.weights == "int4" and self.q4 is not None
            self._uses[kernel] = kernel.weights if shipped or quantize else "dense"
        master = self.weight.dtype
        dense = {k.dtype for k, uses in self._uses.items() if uses == "dense"} - {master}
        self._dense = {d: self._dense[d] if d in self._dense else self.weight.to(d) for d in dense}
        if self.bias is not None:
            self._bias = {d: self.bias.to(d) for d in {k.dtype for k in kernels}}
        int4 = {k.dtype for k, uses in self._uses.items() if uses == "int4"}
        self._int4 = self._pack_int4(int4) if int4 else None
        int8 = {k.dtype for k, uses in self._uses.items() if uses == "int8"}
        self._int8 = self._pack_int8(int8) if int8 else None

    def drop_original(self) -> None:
        """Forget the 4-bit original once no more packing is to come."""
        self.q4 = None

    def _pack_int4(self, dtypes: set[torch.dtype]) -> tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]]:
        source = self.q4 if self.q4 is not None else quantize_q4(self.weight.float())
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(source.q.to(torch.int32), 1)
        # torch's 4-bit kernel computes (q - 8) * scale + zero: Q4_1's min becomes min + 8 * scale.
        zero = source.min + 8 * source.scale
        scale_zeros = torch.stack((source.scale, zero), dim=-1).transpose(0, 1).contiguous()
        return packed, {d: scale_zeros.to(d) for d in dtypes}

    def _pack_int8(self, dtypes: set[torch.dtype]) -> tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]]:
        weight = self.weight.float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return quantized.to(self.weight.device), {d: scale.to(d) for d in dtypes}


def quantize_q4(weight: torch.Tensor) -> Q4Groups:
    """Q4_1-style 4-bit groups of a dense weight: w ~ scale * q + min, q in 0..15."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return Q4Groups(q.to(torch.uint8).view(rows, cols), scale, low)
