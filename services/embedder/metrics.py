"""The embedder's own Prometheus series (its load report is exported by the server's collector)."""

from __future__ import annotations

from prometheus_client import Histogram

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

BATCH_SIZE = Histogram("infermesh_embedder_batch_size", "Inputs per encoded batch.", buckets=_SIZES)
BATCH_TOKENS = Histogram(
    "infermesh_embedder_batch_tokens",
    "Tokens per encoded batch.",
    buckets=tuple(16 * size for size in _SIZES),
)
