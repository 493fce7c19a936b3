"""Add sqla_orders.note and an index on sqla_orders.customer."""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("sqla_orders", sa.Column("note", sa.Text, nullable=True))
    op.create_index("sqla_orders_customer_idx", "sqla_orders", ["customer"])


def downgrade():
    op.drop_index("sqla_orders_customer_idx", table_name="sqla_orders")
    op.drop_column("sqla_orders", "note")
