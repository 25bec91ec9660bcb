"""client rate limits

Revision ID: abfa82aaabe9
Revises: 77e7cf0e2f22
Create Date: 2026-11-29 05:45:43.983642
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "abfa82aaabe9"
down_revision: str | None = "77e7cf0e2f22"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_per_second", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("rate_limit_per_second")
