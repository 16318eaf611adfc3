"""A naive byte splice: the floor for any Python proxy on this machine, measured by ``make bench``.

``python -m bench.splice --listen 127.0.0.1:PORT --upstream HOST:PORT``: one upstream TCP connection
per client, every byte passed on as it arrives, in both directions, on uvloop. No parsing, no
pooling, no failover: what is left when a proxy does nothing but forward. The benchmark runs it
next to PgBouncer and the sidecar, so the sidecar's cost of looking at the protocol can be told
apart from the cost of Python and the event loop themselves.

Buffers stay bounded: a side that cannot keep up pauses reading on the other side.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One TCP connection of a spliced pair; `peer` is the other one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # client bytes that arrived before the upstream connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(_Side, *self.upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        out = server.transport
        if out is None:
            return
        if self.transport is None:  # the client left meanwhile
            out.close()
            return
        server.peer, self.peer = self, server
        for data in self.pending:
            out.write(data)
        self.pending = []


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream), *listen, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.splice", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=_hostport, required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    uvloop.run(_serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
