"""Timezone-aware timestamps: items.created_at becomes timestamptz.

A new migration rather than an edit of the initial one, which databases have already applied.
The cast reads each stored value in the migrating session's time zone: the server's default,
which is also what the service's sessions wrote `now()` in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "items",
        "created_at",
        type_=sa.DateTime(timezone=True),
        existing_type=sa.DateTime(),
        existing_nullable=False,
        existing_server_default=sa.func.now(),
    )


def downgrade() -> None:
    op.alter_column(
        "items",
        "created_at",
        type_=sa.DateTime(),
        existing_type=sa.DateTime(timezone=True),
        existing_nullable=False,
        existing_server_default=sa.func.now(),
    )
