"""stage change reasons; tag search index on PostgreSQL

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-26 01:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stage_changes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(length=500), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # Tag search (`tags::jsonb @> '["stack:java"]'`) uses this; SQLite scans json_each per row instead.
        op.execute("CREATE INDEX ix_candidates_tags_gin ON candidates USING gin ((tags::jsonb) jsonb_path_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_candidates_tags_gin")
    with op.batch_alter_table("stage_changes", schema=None) as batch_op:
        batch_op.drop_column("reason")
