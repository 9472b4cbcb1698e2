"""Database schema of the session service (the migrations in migrations/ build exactly this)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(naming_convention={"pk": "pk_%(table_name)s"})


class UtcDateTime(sa.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if not isinstance(value, dt.datetime):
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
BigIntPk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# The client-visible id is unique per tenant only, so two tenants may pick the
# same id without learning about each other; rows link through the surrogate pk.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("pk", BigIntPk, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(128), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("user_id", sa.String(256), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("metadata", JsonDoc, nullable=False),
    sa.Column("last_seq", sa.BigInteger(), nullable=False),
    sa.Column("retention_days", sa.Integer(), nullable=False),
    sa.UniqueConstraint("tenant", "id", name="uq_sessions_tenant_id"),
    sa.Index("ix_sessions_tenant_user_id", "tenant", "user_id"),
)

# The primary key is UNIQUE(session_pk, seq). client_msg_id is NULL when the
# client gave none: NULLs never collide in a unique constraint, empty strings would.
messages = sa.Table(
    "messages",
    metadata,
    sa.Column(
        "session_pk",
        sa.BigInteger(),
        sa.ForeignKey("sessions.pk", ondelete="CASCADE", name="fk_messages_session_pk_sessions"),
        nullable=False,
    ),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("client_msg_id", sa.String(128), nullable=True),
    sa.Column("role", sa.SmallInteger(), nullable=False),
    # Plaintext only in rows written before encryption (key_id NULL); rotate-keys seals them.
    sa.Column("content", sa.Text(), nullable=True),
    sa.Column("token_count", sa.Integer(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # Which key of the ring sealed content_enc (nonce || AES-GCM ciphertext and tag).
    sa.Column("key_id", sa.String(64), nullable=True),
    sa.Column("content_enc", sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint("session_pk", "seq", name="pk_messages"),
    sa.UniqueConstraint("session_pk", "client_msg_id", name="uq_messages_session_pk_client_msg_id"),
)

# API keys: only the salted hash of the secret part; the prefix is the public name of a key.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("prefix", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("description", sa.String(512), nullable=False),
    sa.Column("salt", sa.LargeBinary(), nullable=False),
    sa.Column("key_hash", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    sa.Index("ix_api_keys_tenant", "tenant"),
)

# Security-relevant events; append-only (database triggers refuse UPDATE and DELETE).
# Never message content, never keys: a key is named by its prefix.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", BigIntPk, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("key_prefix", sa.String(32), nullable=False),
    sa.Column("trace_id", sa.String(64), nullable=False),
    sa.Column("method", sa.String(256), nullable=False),
    sa.Column("detail", sa.String(1024), nullable=False),
    sa.Index("ix_audit_log_tenant_id", "tenant", "id"),
)
