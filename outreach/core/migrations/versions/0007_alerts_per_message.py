"""alerts name the outbound message they are about (one per message and kind)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 02:20:00
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: Alerts raised per message before this revision named it at the end of their text.
_TAG = re.compile(r"\[outbox ([0-9a-zA-Z_-]{1,32})\]$")


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outbox_id", sa.String(length=32), nullable=True))
    bind = op.get_bind()
    alerts = sa.table(
        "alerts",
        sa.column("id", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("message", sa.String),
        sa.column("outbox_id", sa.String),
    )
    tagged = bind.execute(
        sa.select(alerts.c.id, alerts.c.kind, alerts.c.message)
        .where(alerts.c.message.like("%[outbox %]"))
        .order_by(alerts.c.id)
    ).all()
    seen: set[tuple[str, str]] = set()
    for alert_id, kind, text in tagged:
        found = _TAG.search(text)
        if found and (kind, found.group(1)) not in seen:  # a duplicate keeps its text, not the key
            seen.add((kind, found.group(1)))
            bind.execute(sa.update(alerts).where(alerts.c.id == alert_id).values(outbox_id=found.group(1)))
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_alerts_outbox_kind", ["outbox_id", "kind"])


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_constraint("uq_alerts_outbox_kind", type_="unique")
        batch_op.drop_column("outbox_id")
