"""The demo's status page: the sidecar's view of the cluster and a live chart of order latency.

It lives in the runner, not in the Cafe: the app knows nothing about the sidecar.
"""

from .server import StatusServer

__all__ = ["StatusServer"]
