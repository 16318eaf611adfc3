"""The store factory: which `SpoolStore` a config names. Apart from the contract (store.py),
which the backends import, so that the contract does not import them back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .store import SpoolStore

if TYPE_CHECKING:
    from sidecar_config import SpoolConfig


def make_store(config: SpoolConfig) -> SpoolStore | None:
    """The store `config` describes, not yet opened (None for backend none)."""
    if config.backend == "none":
        return None
    if config.backend == "sqlite":
        from .sqlite_store import SqliteSpoolStore

        return SqliteSpoolStore(config.path)
    # Imported only when configured: a sidecar without DynamoDB never loads boto3 for it.
    from .dynamo_store import DynamoSpoolStore

    dyn = config.dynamodb
    return DynamoSpoolStore(
        table=dyn.table, region=dyn.region, endpoint_url=dyn.endpoint_url, create_table=dyn.create_table
    )


async def open_store(config: SpoolConfig) -> SpoolStore | None:
    """Make and open the configured store (None for backend none); SpoolUnavailable on failure."""
    store = make_store(config)
    if store is not None:
        await store.open()
    return store
