"""suppression scope: nurture only, all email, all SMS, or a provider block

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 10:00:00

Existing rows get the scope their source meant: the one-click unsubscribe link (source ``link``) was only ever in
nurture mail, so it stops nurture; what a provider reported (``sendgrid``, ``twilio``, and ``provider`` for a
refusal such as Twilio 21610) is a provider block; anything else (the SMS opt-out keyword, rows written by hand)
keeps stopping its whole channel. A downgrade drops the column, so every row stops its whole channel again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scope", sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE suppressions SET scope = CASE"
        " WHEN source = 'link' THEN 'nurture'"
        " WHEN source IN ('sendgrid', 'twilio', 'provider') THEN 'provider'"
        " ELSE channel END"
    )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.alter_column("scope", existing_type=sa.String(length=16), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_column("scope")
