"""Message content encrypted at rest: key id and sealed content per row.

Rows written before this revision keep their plaintext in `content` with a NULL
key id until `python -m services.session rotate-keys` seals them.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite can only change a column's nullability by copying the table.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("content_enc", sa.LargeBinary(), nullable=True))
        batch.alter_column("content", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    sealed = op.get_bind().execute(sa.text("SELECT count(*) FROM messages WHERE key_id IS NOT NULL"))
    if sealed.scalar_one():
        # The migration holds no keys: going back would lose every sealed message.
        raise RuntimeError("messages are encrypted: downgrading below 0002 would lose their content")
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("content", existing_type=sa.Text(), nullable=False)
        batch.drop_column("content_enc")
        batch.drop_column("key_id")
