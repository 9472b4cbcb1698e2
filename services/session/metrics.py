"""The session service's own Prometheus series (window cache events are in cache.py)."""

from __future__ import annotations

from prometheus_client import Counter

BACKEND_ERRORS = Counter(
    "infermesh_session_backend_errors_total",
    "Failed calls to the database (Postgres or SQLite) or to Redis, by backend and error type.",
    ["backend", "error"],
)
