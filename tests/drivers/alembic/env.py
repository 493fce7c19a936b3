"""Alembic environment for tests/drivers: online migrations only, against the
URL the caller put in the config (sqlalchemy.url), with a version table of the
test's own (sqla_alembic_version) so its tables share one prefix."""
from alembic import context
from sqlalchemy import create_engine

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, version_table="sqla_alembic_version")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
