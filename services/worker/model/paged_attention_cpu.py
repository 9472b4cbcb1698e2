"""Decode attention read straight from the paged cache on CPU: one small C++ kernel, built once.

Attention in torch ops must gather every sequence's keys and values out of their blocks into
a padded batch before two batched matmuls read them again: three passes over the cache per
layer, and at 64 sequences of a few hundred positions that traffic cost about as much as the
projections. This kernel walks each sequence's block table and reads every key and value once,
no padding (the way vLLM's and SGLang's CPU backends attend). It is compiled with the system's
C++ compiler on first use and kept in torch's extension cache; where there is no compiler the
worker attends in torch ops as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

constexpr int64_t kLanes = 16;

// q [n, heads, d]; k/v [kv_heads, slots, d] (one layer); tables [n, width] of block ids;
// lengths [n]: positions each sequence attends to. Returns [n, heads, d].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor tables, torch::Tensor lengths,
                               int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
              v.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
              tables.is_contiguous() && lengths.is_contiguous(), "contiguous inputs only");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k.size(0), slots = k.size(1), width = tables.size(1);
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * d);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / kv_heads, h = job % kv_heads;
      const int64_t length = lp[i];
      const float* query = qp + (i * heads + h * group) * d;
      const float* kh = kp + h * slots * d;
      const float* vh = vp + h * slots * d;
      const int64_t* table = tp + i * width;
      scores.assign(group * length, 0.f);
      std::vector<float> top(group, -std::numeric_limits<float>::infinity());
      for (int64_t p = 0; p < length; ++p) {
        const float* key = kh + (table[p / block_size] * block_size + p % block_size) * d;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query + g * d;
          // Independent partial sums, so the compiler vectorises the dot product without being
          // allowed to reorder a single floating-point sum.
          float lanes[kLanes] = {0.f};
          int64_t x = 0;
          for (; x + kLanes <= d; x += kLanes)
            for (int64_t j = 0; j < kLanes; ++j) lanes[j] += qg[x + j] * key[x + j];
          float s = 0.f;
          for (; x < d; ++x) s += qg[x] * key[x];
          for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
          s *= fscale;
          scores[g * length + p] = s;
          top[g] = std::max(top[g], s);
        }
      }
      std::vector<float> total(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * length;
        for (int64_t p = 0; p < length; ++p) {
          row[p] = std::exp(row[p] - top[g]);
          total[g] += row[p];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < length; ++p) {
        const float* value = vh + (table[p / block_size] * block_size + p % block_size) * d;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * length + p];
          float* a = acc.data() + g * d;
          for (int64_t x = 0; x < d; ++x) a[x] += w * value[x];
        }
      }
      float* dst = op + (i * heads + h * group) * d;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / total[g];
        for (int64_t x = 0; x < d; ++x) dst[g * d + x] = acc[g * d + x] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
"""


@functools.cache
def kernel() -> Any | None:
    """The compiled module, or None where it cannot be built (no compiler, not a CPU build)."""
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            # Built for this CPU (-march=native): a build cache shared with another kind of CPU
            # must not hand it this one's binary.
            name=f"infermesh_paged_decode_attention_{_cpu_key()}",
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            with_cuda=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: torch ops attend instead
        logger.warning("paged decode attention kernel not built (%s): attending in torch ops", exc)
        return None
    return module


def _cpu_key() -> str:
    """A short digest of what -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor() or platform.machine()
    wanted = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted or [info]).encode()).hexdigest()[:12]


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and kernel() is not None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """q [n, heads, head_dim]; k/v_cache [kv_heads, slots, head_dim]; tables [n, width] int64,
    lengths [n] int64: outputs [n, heads, head_dim]."""
    module = kernel()
    assert module is not None
    out: torch.Tensor = module.decode_attention(
        q, k_cache, v_cache, tables, lengths, block_size, q.shape[-1] ** -0.5
    )
    return out
