"""Create sqla_orders."""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "sqla_orders",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("sqla_users.id"), nullable=False),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("total", sa.Numeric(10, 2), nullable=False, server_default="0"),
    )


def downgrade():
    op.drop_table("sqla_orders")
