"""A deliberately tiny raw-socket PostgreSQL client for tests that send bytes no driver would.

It shares no code with the proxy's codec, so a bug there cannot hide itself in the test.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


@dataclass
class Msg:
    type: str
    body: bytes

    def error_fields(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for part in self.body.split(b"\x00"):
            if part:
                fields[chr(part[0])] = part[1:].decode()
        return fields

    @property
    def sqlstate(self) -> str | None:
        return self.error_fields().get("C") if self.type in "EN" else None


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, user: str, database: str = "appdb", version: int = 196608, **params: str) -> None:
        body = struct.pack("!i", version)
        for key, value in {"user": user, "database": database, **params}.items():
            body += key.encode() + b"\x00" + value.encode() + b"\x00"
        body += b"\x00"
        self.send(struct.pack("!i", len(body) + 4) + body)

    def query(self, sql: str) -> None:
        payload = sql.encode() + b"\x00"
        self.send(b"Q" + struct.pack("!i", len(payload) + 4) + payload)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_byte(self) -> bytes:
        while not self.buf:
            if not self._fill():
                return b""
        byte, self.buf = self.buf[:1], self.buf[1:]
        return byte

    def read(self) -> Msg | None:
        """The next message, or None at EOF."""
        while len(self.buf) < 5:
            if not self._fill():
                return None
        (length,) = struct.unpack("!i", self.buf[1:5])
        while len(self.buf) < 1 + length:
            if not self._fill():
                return None
        msg = Msg(chr(self.buf[0]), self.buf[5 : 1 + length])
        self.buf = self.buf[1 + length :]
        return msg

    def read_until(self, types: str) -> list[Msg]:
        """Messages up to and including the first of `types` (or EOF)."""
        out: list[Msg] = []
        while True:
            msg = self.read()
            if msg is None:
                return out
            out.append(msg)
            if msg.type in types:
                return out

    def closed_by_peer(self) -> bool:
        """True once the other side has closed (EOF), after draining anything still buffered."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False  # still open after the socket timeout
        return True

    def close(self) -> None:
        self.sock.close()


def login_trust(port: int, user: str = "app_trust", database: str = "appdb") -> RawClient:
    """A raw connection logged in through a sidecar configured with `auth.method: trust`."""
    client = RawClient(port)
    client.startup(user, database)
    msgs = client.read_until("ZE")
    if not msgs or msgs[-1].type != "Z":
        raise AssertionError(f"login failed: {[(m.type, m.body) for m in msgs]}")
    return client
