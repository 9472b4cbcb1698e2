"""Sessions and messages.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types in services/session/tables.py as of this revision.
BigIntPk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Utc = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("pk", BigIntPk, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("created_at", Utc, nullable=False),
        sa.Column("updated_at", Utc, nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_sessions"),
        sa.UniqueConstraint("tenant", "id", name="uq_sessions_tenant_id"),
    )
    op.create_index("ix_sessions_tenant_user_id", "sessions", ["tenant", "user_id"])
    op.create_table(
        "messages",
        sa.Column("session_pk", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("client_msg_id", sa.String(128), nullable=True),
        sa.Column("role", sa.SmallInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("created_at", Utc, nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.pk"], name="fk_messages_session_pk_sessions", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("session_pk", "seq", name="pk_messages"),
        sa.UniqueConstraint("session_pk", "client_msg_id", name="uq_messages_session_pk_client_msg_id"),
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_index("ix_sessions_tenant_user_id", table_name="sessions")
    op.drop_table("sessions")
