"""Typed configuration of the router: where the workers, embedders and session service are,
and the limits it enforces on requests."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import tls
from services.common.config import ConfigError, metrics_port_setting, otlp_endpoint_setting, section, setting
from services.router.core.catalog import CatalogError, load_catalog
from services.router.core.guardrails.policy import GuardrailConfig
from services.router.core.quotas import QuotaLimits, QuotaSpecError, build_limits
from services.router.core.rbac import RoleError, build_roles


@dataclass(frozen=True)
class QuotaSettings:
    """Per-tenant rate and token limits (`quota_*` outside the code)."""

    requests_per_s: int = setting(0, "Requests per second each tenant may send (0 = no limit).", min=0)
    tokens_per_minute: int = setting(
        0,
        "Tokens (prompt + generated) per minute each tenant may use (0 = no limit); a request reserves "
        "prompt + max_tokens before it runs and is refused when that would pass the limit.",
        min=0,
    )
    token_budget: int = setting(0, "Tokens each tenant may use per budget period (0 = no limit).", min=0)
    budget_period_s: int = setting(86_400, "Length of the token budget period.", min=1)
    overrides: list[str] = setting(
        [],
        "Per-tenant quotas, each 'tenant:tokens_per_minute=N:token_budget=N:requests_per_s=N"
        ":budget_period_s=N' (fields left out keep the defaults above).",
    )
    redis_url: str = setting(
        "",
        "Redis shared by the router replicas for quota counters; empty counts in this replica only. "
        "While Redis is away each replica counts locally (infermesh_router_quota_fallback_total).",
    )
    redis_prefix: str = setting("infermesh:quota", "Prefix of the quota counters' Redis keys.")
    redis_timeout_s: float = setting(
        0.1, "Bound on each quota call to Redis; slower calls fall back to local counting.", min=0.001, max=10
    )

    def base(self) -> QuotaLimits:
        """The limits of a tenant without an override."""
        return QuotaLimits(
            requests_per_s=self.requests_per_s,
            tokens_per_minute=self.tokens_per_minute,
            token_budget=self.token_budget,
            budget_period_s=self.budget_period_s,
        )

    def by_tenant(self) -> dict[str, QuotaLimits]:
        return build_limits(self.base(), self.overrides)

    def check(self) -> None:
        try:
            self.by_tenant()
        except QuotaSpecError as exc:
            raise ConfigError(f"router.quota_overrides: {exc}") from None
        redis_scheme = self.redis_url.split("://", 1)[0]
        if self.redis_url and redis_scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"router.quota_redis_url scheme {redis_scheme!r}: must be redis, rediss or unix"
            )


@dataclass(frozen=True)
class GuardSettings:
    """Input and output guardrails (`guard_*` outside the code)."""

    max_input_chars: int = setting(
        0, "Longest input (all messages and prompt together, in characters); 0 = no limit.", min=0
    )
    prompt_injection: bool = setting(
        False, "Refuse user and tool turns that the prompt-injection detector flags (INVALID_ARGUMENT)."
    )
    pii_input: bool = setting(
        False, "Redact e-mail, phone, IBAN, card numbers and API-key-like secrets in the input."
    )
    pii_output: bool = setting(
        False, "Redact the same in generated text (streamed text is held back a little for it)."
    )

    def policy(self) -> GuardrailConfig:
        return GuardrailConfig(
            max_input_chars=self.max_input_chars,
            injection=self.prompt_injection,
            pii_input=self.pii_input,
            pii_output=self.pii_output,
        )


@dataclass(frozen=True)
class BatchSettings:
    """Batch jobs and the BATCH priority class (`batch_*` outside the code)."""

    store_url: str = setting(
        "sqlite+aiosqlite://",
        "SQLAlchemy URL of the batch job store. The default keeps jobs in this replica's memory "
        "(lost when it stops); postgresql+asyncpg://user@host/db shares them between replicas, which "
        "then answer for each other's jobs and take over those of a replica that died; "
        "sqlite+aiosqlite:///file keeps them across restarts of a single router.",
    )
    max_items: int = setting(50_000, "Most requests one batch job may carry.", min=1)
    concurrency: int = setting(
        16, "Requests of one batch job this replica runs at a time (all at BATCH priority).", min=1
    )
    jobs_per_replica: int = setting(2, "Batch jobs one replica runs at a time.", min=1)
    item_timeout_s: float = setting(600.0, "Deadline of each batch request, queue wait included.", min=1.0)
    item_attempts: int = setting(
        5, "Tries of a batch request answered UNAVAILABLE or RESOURCE_EXHAUSTED before it fails.", min=1
    )
    retention_days: int = setting(
        7,
        "Finished batch jobs and their results are deleted this many days after they end (0 keeps them).",
        min=0,
    )
    lease_s: float = setting(
        30.0,
        "How long a replica's claim on a running batch job lasts; it is renewed three times as often, "
        "and a claim not renewed in time lets another replica take the job over.",
        min=0.1,
    )
    hold_max_s: float = setting(
        30.0, "Longest a BATCH request is held back while the ladder holds BATCH.", min=0
    )


@dataclass(frozen=True)
class PriorSettings:
    """What the load model assumes of an endpoint before it reports (`prior_*` outside the code)."""

    decode_tokens_per_s: float = setting(
        50.0, "Decode speed assumed for an endpoint until it reports its own.", min=0.001
    )
    prefill_tokens_per_s: float = setting(
        500.0, "Prefill speed assumed for an endpoint until it reports its own.", min=0.001
    )


@dataclass(frozen=True)
class QueueSettings:
    """The admission queue (`queue_*` outside the code)."""

    policy: str = setting(
        "priority",
        "Admission queue order: priority (classes, deadlines, fair share) or fcfs.",
        choices=["priority", "fcfs"],
    )
    aging_s: float = setting(
        30.0, "Seconds of waiting that lift a queued request one priority class (up to INTERACTIVE).", min=0.1
    )


@dataclass(frozen=True)
class AuthSettings:
    """API key authentication (`auth_*` outside the code; the roles are `roles`)."""

    enabled: bool = setting(
        False,
        "Require an API key (authorization: Bearer <key> or x-api-key metadata) on every public RPC "
        "except health and reflection. Off: every caller is tenant 'default' with the admin role.",
    )
    cache_s: float = setting(
        5.0,
        "How long a key's record is cached; a revoked key stops working on other replicas within this.",
        min=0.0,
        max=3600,
    )


@dataclass(frozen=True)
class RouterConfig:
    host: str = setting("127.0.0.1", "Interface the public gRPC API listens on.")
    port: int = setting(50051, "Port of the public gRPC API; 0 picks a free one.", min=0, max=65535)
    log_level: str = setting("info", "Log level.", choices=["debug", "info", "warning", "error"])
    metrics_port: int = metrics_port_setting()
    otlp_endpoint: str = otlp_endpoint_setting()
    tls_cert_file: str = tls.cert_file_setting()
    tls_key_file: str = tls.key_file_setting()
    tls_ca_file: str = tls.ca_file_setting()
    tls_require_client_cert: bool = tls.require_client_cert_setting(False)
    grace_s: float = setting(10.0, "Seconds in-flight streams get to finish on shutdown.", min=0)
    router_id: str = setting("", "Name of this replica in cluster status; empty generates one.")

    worker_addresses: list[str] = setting(
        [],
        "host:port of each generation worker; dns:///host:port stands for every address the name "
        "resolves to (a headless Kubernetes Service: every ready pod), resolved again every "
        "discovery_interval_s.",
    )
    embedder_addresses: list[str] = setting(
        [], "host:port of each embedder (dns:///host:port as for worker_addresses)."
    )
    discovery_interval_s: float = setting(
        5.0, "How often dns:/// addresses are resolved again to follow pods that come and go.", min=0.1
    )
    session_address: str = setting("", "host:port of the session service; empty disables sessions.")

    default_chat_model: str = setting(
        "", "Model used when a Generate request names none; empty = the first chat model reported."
    )
    default_embedding_model: str = setting(
        "", "Model used when an Embed request names none; empty = the first embedding model reported."
    )
    default_max_tokens: int = setting(256, "max_tokens when a request leaves it unset.", min=1)
    max_tokens_limit: int = setting(
        4096, "Largest max_tokens a request may ask for (also capped by the model's context).", min=1
    )
    max_stop_sequences: int = setting(16, "Most stop strings one request may carry.", min=0)
    max_embed_inputs: int = setting(256, "Most inputs one Embed request may carry.", min=1)
    max_request_id_chars: int = setting(128, "Longest request_id a caller may send.", min=8)
    history_token_budget: int = setting(
        2048, "Tokens of session history put before a request (0 = the whole history).", min=0
    )

    load_report_interval_ms: int = setting(
        100, "Interval asked of workers and embedders for their load reports.", min=10, max=60000
    )
    endpoint_stale_s: float = setting(
        2.0, "An endpoint whose latest load report is older than this gets no new requests.", min=0.05
    )
    reconnect_backoff_max_s: float = setting(
        5.0, "Longest wait between reconnection attempts to an endpoint.", min=0.05
    )
    downstream_timeout_s: float = setting(
        10.0,
        "Timeout of unary calls to endpoints and the session service "
        "(a Generate stream is bounded by the caller's deadline instead).",
        min=0.1,
    )
    dispatch_attempts: int = setting(
        2, "Endpoints tried for one request when one is unavailable before answering.", min=1, max=10
    )

    placement_policy: str = setting(
        "predicted_time",
        "predicted_time: earliest predicted completion from measured load and speed; "
        "least_loaded: fewest sequences.",
        choices=["predicted_time", "least_loaded"],
    )
    prior: PriorSettings = section(PriorSettings, "Speeds assumed before an endpoint reports.")
    affinity_factor: float = setting(
        1.5,
        "A session stays on the endpoint that served it (prefix cache) unless its predicted "
        "completion is more than this many times the best one.",
        min=1.0,
    )
    session_affinity: bool = setting(
        True,
        "Send a session's turns to the endpoint that served it (its prefix cache holds the "
        "conversation so far); off: every turn is placed like a request without a session.",
    )
    eject_after_errors: int = setting(
        3, "Consecutive failed requests that take an endpoint out of placement.", min=1
    )
    max_streams_per_worker: int = setting(
        64,
        "Streams this router runs on one worker at a time; more wait in the admission queue, "
        "where priorities, deadlines and tenant fair share order them.",
        min=1,
    )
    priority_headroom: float = setting(
        1.0,
        "Share of max_streams_per_worker that CRITICAL and INTERACTIVE requests may start beyond "
        "it, at once, while lower classes wait in the queue (keeps their time to first token short).",
        min=0,
        max=4,
    )
    queue: QueueSettings = section(QueueSettings, "The admission queue.")
    eject_s: float = setting(
        5.0, "How long an ejected endpoint gets no requests before one probes it again.", min=0.01
    )
    stall_timeout_s: float = setting(
        5.0,
        "A worker stream that sends nothing for this long once tokens flow (or, before the first "
        "token, once its worker stops reporting) is moved to another worker, resumed from the "
        "tokens already delivered.",
        min=0.05,
    )
    failover_attempts: int = setting(
        3, "Workers one Generate may be tried on in all, when streams break or stall.", min=1, max=10
    )
    degradation_thresholds_s: list[float] = setting(
        [2.0, 4.0, 6.0, 10.0, 20.0],
        "Predicted wait (tokens waiting at the workers and in the queue over their measured speed) "
        "at which each degradation step starts: cap max_tokens, fallback model, cached replies, "
        "hold BATCH, refuse.",
    )
    overload_window_s: float = setting(
        1.0,
        "Work queued at a worker counts toward the degradation ladder only once it lasted this long "
        "(the least it reported within this window): a burst being admitted is not overload.",
        min=0,
        max=60,
    )
    degraded_max_tokens: int = setting(
        128, "max_tokens of STANDARD and BATCH requests once the ladder caps it.", min=1
    )
    reply_cache_entries: int = setting(
        1024, "Replies of deterministic requests kept for the cached-reply step (0 = none).", min=0
    )
    catalog_file: str = setting(
        "",
        "TOML model catalog ([[model]] tables: id, tier, context_length, device, min_memory_gb, "
        "description), served by ListModels and used for hardware filtering, fallback tiers and "
        "model 'auto'; empty: the models the workers report.",
    )
    auto_long_prompt_tokens: list[int] = setting(
        [512, 2048],
        "Prompt tokens from which model 'auto' calls for the medium, then the large tier.",
    )

    quota: QuotaSettings = section(QuotaSettings, "Per-tenant rate and token limits.")
    guard: GuardSettings = section(GuardSettings, "Input and output guardrails.")
    batch: BatchSettings = section(BatchSettings, "Batch jobs and the BATCH priority class.")

    auth: AuthSettings = section(AuthSettings, "API key authentication.")
    roles: list[str] = setting(
        [],
        "Extra or overriding roles, each "
        "'name:rpcs=inference,sessions:models=m1,m2:priorities=standard,batch' (rpcs: inference, "
        "sessions, batches, status, admin; '*' = all). Built in: admin, user, batch, reader.",
    )

    def check(self) -> None:
        tls.TlsConfig.of(self).check("router")
        for name in ("worker_addresses", "embedder_addresses"):
            addresses: list[str] = getattr(self, name)
            for address in addresses:
                _check_address(f"router.{name}", address)
            if len(set(addresses)) != len(addresses):
                raise ConfigError(f"router.{name}={addresses!r}: addresses must be distinct")
        if self.session_address:
            _check_address("router.session_address", self.session_address)
        if self.auth.enabled and not self.session_address:
            raise ConfigError("router.auth_enabled=true: needs session_address (API keys live there)")
        try:
            build_roles(self.roles)
        except RoleError as exc:
            raise ConfigError(f"router.roles: {exc}") from None
        if self.catalog_file:
            try:
                load_catalog(self.catalog_file)
            except CatalogError as exc:
                raise ConfigError(f"router.catalog_file={exc}") from None
        thresholds = self.degradation_thresholds_s
        if len(thresholds) != 5 or thresholds != sorted(thresholds) or thresholds[0] <= 0:
            raise ConfigError(
                f"router.degradation_thresholds_s={thresholds!r}: must be 5 positive, increasing seconds"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"router.default_max_tokens={self.default_max_tokens}: "
                f"must be <= max_tokens_limit ({self.max_tokens_limit})"
            )
        # A report interval close to the staleness window would make healthy endpoints flap.
        if self.endpoint_stale_s * 1000 < 2 * self.load_report_interval_ms:
            raise ConfigError(
                f"router.endpoint_stale_s={self.endpoint_stale_s}: must be at least twice "
                f"load_report_interval_ms ({self.load_report_interval_ms} ms)"
            )


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.removeprefix("dns:///").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={address!r}: must be host:port")
