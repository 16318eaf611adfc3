"""The operator's HTTP endpoint on `metrics_listen`: GET /metrics, /healthz, /readyz.

A deliberately small HTTP/1.1 server on the sidecar's own event loop (no thread, no framework):
it reads one request, answers, and closes. Requests are bounded in size and time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from . import logs

_MAX_REQUEST = 8192
_TIMEOUT = 5.0

Readiness = Callable[[], tuple[bool, str]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class _HttpConnection(asyncio.Protocol):
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._registry = registry
        self._readiness = readiness
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(_TIMEOUT, self._transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n\r\n" not in self._buf and b"\n\n" not in self._buf:
            if len(self._buf) > _MAX_REQUEST:
                self._respond(431, "text/plain", b"request too large\n")
            return
        line = bytes(self._buf.split(b"\n", 1)[0]).decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            self._respond(400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(405, "text/plain", b"only GET\n")
        elif target == "/metrics":
            self._respond(200, CONTENT_TYPE_LATEST, generate_latest(self._registry), head=method == "HEAD")
        elif target == "/healthz":
            self._respond(200, "text/plain", b"ok\n", head=method == "HEAD")
        elif target == "/readyz":
            ready, reason = self._readiness()
            body = json.dumps({"ready": ready, "reason": reason}).encode() + b"\n"
            self._respond(200 if ready else 503, "application/json", body, head=method == "HEAD")
        else:
            self._respond(404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n")

    def _respond(self, status: int, content_type: str, body: bytes, head: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        reason = _REASONS.get(status, "")
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        transport.write(header if head else header + body)
        transport.close()


async def serve(host: str, port: int, registry: CollectorRegistry, readiness: Readiness) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HttpConnection(registry, readiness), host, port, reuse_address=True
    )
    logs.event("metrics_listening", listen=f"{host}:{port}")
    return server
