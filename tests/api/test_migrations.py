"""Alembic migrations build the schema on an empty PostgreSQL database, and match the models."""

from __future__ import annotations

import uuid

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import PG_ADMIN_URL

from qaas.db.migrate import alembic_config, upgrade
from qaas.db.models import Base


def test_upgrade_empty_postgres_downgrade_and_again():
    name = f"qaas_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
    try:
        upgrade(url)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert {"jobs", "job_events", "api_keys", "alembic_version", "hub_credentials", "webhook_endpoints", "webhook_deliveries", "webhook_delivery_attempts"} <= tables
            # the migrations produce exactly what the models describe
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], diff
        command.downgrade(alembic_config(url), "base")
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
        upgrade(url)
        engine.dispose()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert {"jobs", "job_events", "api_keys"} <= set(sa.inspect(conn).get_table_names())
