"""The Cafe demo app (Flask + SQLAlchemy 2 + psycopg 3), which knows nothing about failover."""

from .app import create_app, order_digest, parse_when
from .schema import SCHEMA_SQL, install_schema

__all__ = ["SCHEMA_SQL", "create_app", "install_schema", "order_digest", "parse_when"]
