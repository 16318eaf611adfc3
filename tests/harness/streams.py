"""Recorded client byte streams, for the protocol fuzzer (tests/fuzz/).

A stream is everything one real client connection sent to a real PostgreSQL server, as captured
by ``RecordingRelay`` (tests/fuzz/record.py writes them to tests/fuzz/streams/*.bin). A stream has
two phases: the login (SSL/GSS requests, the startup packet, password messages) and the session
(typed messages after AuthenticationOk). The fuzzer mutates one phase or the other.

The framing here is deliberately independent of the proxy's codec, like tests/harness/wire.py: a
bug in proxy/protocol must not be able to hide itself.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

STREAMS_DIR = Path(__file__).resolve().parents[1] / "fuzz" / "streams"

# Request codes that stand where a startup packet's protocol version would be.
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
_NEGOTIATION = (SSL_REQUEST, GSSENC_REQUEST)


@dataclass(frozen=True)
class Stream:
    """One recorded client connection."""

    name: str  # file stem, e.g. "psycopg_extended-0"
    data: bytes

    @property
    def client(self) -> str:
        return self.name.rsplit("-", 1)[0]

    def split(self) -> tuple[bytes, bytes]:
        """(login bytes, session bytes); the session starts with the first non-'p' message."""
        pos = 0
        data = self.data
        while len(data) - pos >= 8:
            (length, code) = struct.unpack_from("!ii", data, pos)
            if length < 8 or pos + length > len(data):
                break
            pos += length
            if code not in _NEGOTIATION:
                break  # the startup packet (or a cancel request) itself
        while len(data) - pos >= 5 and data[pos : pos + 1] == b"p":
            (length,) = struct.unpack_from("!i", data, pos + 1)
            if length < 4:
                break
            pos += 1 + length
        return data[:pos], data[pos:]

    @property
    def login(self) -> bytes:
        return self.split()[0]

    @property
    def session(self) -> bytes:
        return self.split()[1]


def load_streams(directory: Path = STREAMS_DIR) -> list[Stream]:
    """Every recorded stream, sorted by name (deterministic order for the fuzzer)."""
    return [Stream(p.stem, p.read_bytes()) for p in sorted(directory.glob("*.bin"))]


def frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Split typed messages (type byte, int32 length including itself, body): (whole messages,
    the remainder that does not form one). A length below 4 ends the split there."""
    out: list[bytes] = []
    pos = 0
    while len(data) - pos >= 5:
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append(data[pos : pos + 1 + length])
        pos += 1 + length
    return out, data[pos:]


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def startup_packet(user: str, database: str = "appdb", **params: str) -> bytes:
    body = struct.pack("!i", 196608)
    for key, value in {"user": user, "database": database, **params}.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


class RecordingRelay:
    """A TCP relay in front of ``upstream`` that keeps what each client connection sent.

    ``connections`` holds one bytearray per accepted connection, in accept order; what the server
    sends back is forwarded and not kept."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[bytearray] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True, name="recording-relay")
        accept.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            record = bytearray()
            with self._lock:
                self.connections.append(record)
                self._sockets += [client, server]
            for src, dst, keep in ((client, server, record), (server, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, keep), daemon=True)
                self._threads.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        src.settimeout(None)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if keep is not None:
                keep += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every relayed connection has ended (both directions)."""
        for t in list(self._threads):
            t.join(timeout)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
