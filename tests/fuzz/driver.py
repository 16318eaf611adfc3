"""What the fuzzer does with one input, and what it watches while it runs.

- ``run_session_input``: log in (trust), send a mutated session stream, then a probe; the sidecar
  must answer the probe or close the connection with an ErrorResponse.
- ``run_login_input``: send a mutated login stream; the sidecar must log the client in, or close
  the connection with an ErrorResponse, by ``client_login_timeout`` (plus slack).
- ``flood``: push far more bytes than any buffer should hold, without reading the answers.
- ``Bystander``: a well-behaved psycopg client beside the fuzzer, checking every answer.
- ``SidecarWatch``: the sidecar's log (no traceback) and memory (RSS below a bound).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.fuzz.mutations import FuzzInput
from tests.harness.sidecar import SidecarProcess
from tests.harness.streams import CANCEL_REQUEST, message, query, startup_packet

USER = "app_scram"  # raw fuzz sessions and the bystander share one pool: (app_scram, appdb)
ANSWER_TIMEOUT = 20.0  # far above any answer on a loaded box; reaching it means "never answered"
MIB = 1024 * 1024


class Conn:
    """A raw socket with a deadline on every read, and a lenient reader of typed messages."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes, cuts: tuple[int, ...] = ()) -> bool:
        """Send in pieces (split at `cuts`); False when the sidecar closed the connection first."""
        bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
        try:
            for a, b in itertools.pairwise(bounds):
                if b > a:
                    self.sock.sendall(data[a:b])
        except OSError:
            return False
        return True

    def fill(self, deadline: float) -> bool:
        """Read what arrives before `deadline`; False on EOF or at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def messages(self, start: int = 0) -> list[tuple[bytes, bytes]]:
        """Typed messages in the buffer from offset `start` (a torn tail is left out)."""
        out = []
        pos = start
        while len(self.buf) - pos >= 5:
            (length,) = struct.unpack_from("!i", self.buf, pos + 1)
            if length < 4 or pos + 1 + length > len(self.buf):
                break
            out.append((bytes(self.buf[pos : pos + 1]), bytes(self.buf[pos + 5 : pos + 1 + length])))
            pos += 1 + length
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def has_error(buf: bytes | bytearray) -> bool:
    """An ErrorResponse somewhere in what the sidecar sent (its severity field leads the body)."""
    return re.search(rb"E\x00\x00..S(FATAL|ERROR|PANIC)\x00", bytes(buf), re.S) is not None


def login(port: int, user: str = USER, deadline_s: float = ANSWER_TIMEOUT) -> Conn:
    conn = Conn(port)
    conn.send(startup_packet(user, application_name="fuzz"))
    deadline = time.monotonic() + deadline_s
    while not any(t == b"Z" for t, _ in conn.messages()):
        if not conn.fill(deadline):
            conn.close()
            raise AssertionError(f"trust login failed: {bytes(conn.buf)!r}")
    conn.buf.clear()
    return conn


def probe(token: str) -> bytes:
    # Sync ends an extended-protocol exchange (or its error state); the empty Query ends a COPY FROM
    # STDIN with an error (a Sync in COPY is ignored), which in extended mode needs the second Sync;
    # the ROLLBACK ends a transaction the input left open (or aborted).
    sync = message(b"S")
    return sync + query("") + sync + query(f"ROLLBACK; SELECT '{token}'")


def run_session_input(
    port: int, fi: FuzzInput, timeout: float = ANSWER_TIMEOUT, outage: bool = False
) -> str | None:
    """None if the sidecar behaved; else what went wrong. During an outage (`outage`) the probe's
    SELECT cannot be served: its 57P03 (after hold_timeout) is the answer."""
    conn = login(port)
    try:
        if fi.disconnect_at is not None:
            conn.send(fi.data[: fi.disconnect_at], fi.cuts)
            return None
        if not fi.complete:
            # A message still missing bytes: the sidecar rightly waits for them.
            conn.send(fi.data, fi.cuts)
            return None
        token = f"fuzz-probe-{uuid.uuid4().hex[:12]}"
        conn.send(fi.data + probe(token), fi.cuts)
        deadline = time.monotonic() + timeout
        while True:
            if token.encode() in conn.buf and any(
                t == b"D" and token.encode() in body for t, body in conn.messages()
            ):
                return None
            if outage and _refused_in_outage(conn):
                return None
            if not conn.fill(deadline):
                break
        if conn.eof:
            if has_error(conn.buf) or fi.terminates:
                return None
            return f"connection closed without an ErrorResponse; got {_types(conn)}"
        return f"probe not answered within {timeout:g}s; got {_types(conn)}"
    finally:
        conn.close()


def run_login_input(port: int, fi: FuzzInput, bound: float) -> str | None:
    """The login phase must end by `bound` seconds: logged in, or closed with an ErrorResponse."""
    conn = Conn(port)
    try:
        conn.send(fi.data, fi.cuts) if fi.disconnect_at is None else conn.send(
            fi.data[: fi.disconnect_at], fi.cuts
        )
        if fi.disconnect_at is not None:
            return None
        deadline = time.monotonic() + bound
        while conn.fill(deadline):
            if _logged_in(conn.buf):
                return None
        if conn.eof:
            cancel = len(fi.data) >= 8 and struct.unpack_from("!i", fi.data, 4)[0] == CANCEL_REQUEST
            if has_error(conn.buf) or cancel or fi.terminates:
                return None
            return f"connection closed without an ErrorResponse; got {bytes(conn.buf[:200])!r}"
        return f"login neither completed nor refused within {bound:g}s; got {bytes(conn.buf[:200])!r}"
    finally:
        conn.close()


def _refused_in_outage(conn: Conn) -> bool:
    # The probe's two Syncs and two Queries answered (at least three ReadyForQuery: a Sync inside
    # COPY gets none), the last of them with 57P03.
    msgs = conn.messages()
    return (
        len(msgs) >= 2
        and msgs[-1][0] == b"Z"
        and msgs[-2][0] == b"E"
        and b"C57P03\x00" in msgs[-2][1]
        and sum(1 for t, _ in msgs if t == b"Z") >= 3
    )


def _logged_in(buf: bytearray) -> bool:
    return re.search(rb"Z\x00\x00\x00\x05[ITE]", bytes(buf)) is not None


def _types(conn: Conn) -> str:
    return "".join(t.decode(errors="replace") for t, _ in conn.messages())[-60:] + f" ({len(conn.buf)} bytes)"


# ---------------------------------------------------------------------------------------------
# Floods: inputs that only an unbounded buffer would swallow
# ---------------------------------------------------------------------------------------------


@dataclass
class FloodResult:
    name: str
    sent: int  # bytes the sidecar (or the kernel's socket buffers) accepted
    rss_mib: float  # sidecar RSS right after, connection still open
    answered: str  # what the sidecar said (types), or "" if nothing
    refused: bool | None = None  # flood_unauthenticated: refused with an ErrorResponse at once


def flood(
    sidecar: SidecarProcess,
    name: str,
    head: bytes,
    chunk: bytes,
    logged_in: bool,
    total: int = 96 * MIB,
    seconds: float = 2.0,
) -> FloodResult:
    """Send `head`, then `chunk` repeatedly up to `total` bytes or `seconds`, never reading."""
    conn = login(sidecar.port) if logged_in else Conn(sidecar.port)
    try:
        conn.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + seconds
        pending = memoryview(head)
        block = chunk * max(1, 65536 // max(1, len(chunk)))
        while time.monotonic() < deadline and sent < total:
            if not pending:
                pending = memoryview(block)
            try:
                n = conn.sock.send(pending)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                break
            sent += n
            pending = pending[n:]
        rss = rss_mib(sidecar.pid)
        conn.sock.setblocking(True)
        conn.fill(time.monotonic() + 0.5)
        return FloodResult(name, sent, rss, _types(conn))
    finally:
        conn.close()


def flood_unauthenticated(sidecar: SidecarProcess, clients: int = 64) -> FloodResult:
    """`clients` connections each start a 1 MiB password message and send all but its last byte,
    before anyone has authenticated. No login needs more than a few KiB (PostgreSQL caps a SASL
    message at 64 KiB), so each should be refused with an ErrorResponse from its header alone;
    a sidecar that waits for the body holds clients x 1 MiB for strangers."""
    size = 1024 * 1024 - 64
    body = b"SCRAM-SHA-256\x00" + struct.pack("!i", size) + b"n" * (size - 32)
    msg = b"p" + struct.pack("!i", 4 + len(body)) + body
    conns: list[Conn] = []
    sent = 0
    try:
        for _ in range(clients):
            conn = Conn(sidecar.port)
            conns.append(conn)
            conn.sock.settimeout(2)
            try:
                conn.sock.sendall(startup_packet(USER))
                conn.sock.sendall(msg[:-1])
                sent += len(msg) - 1
            except OSError:
                pass  # refused early: what a bounded sidecar does
        rss = rss_mib(sidecar.pid)
        # Judged on the newest connection, well within client_login_timeout (which would also
        # close it with an error): refused from the header, or left waiting for the body.
        last = conns[-1]
        deadline = time.monotonic() + 0.5
        while not has_error(last.buf) and last.fill(deadline):
            pass
        refused = has_error(last.buf)
        name = f"{clients} unauthenticated clients x 1 MiB password message"
        return FloodResult(name, sent, rss, "refused" if refused else "waiting for the body", refused)
    finally:
        for conn in conns:
            conn.close()


def floods(sidecar: SidecarProcess, logged_in: bool, authenticates: bool = False) -> list[FloodResult]:
    """The floods for one sidecar: before login (a startup packet and a password message that
    claim ~1 GiB; with `authenticates`, i.e. not trust, many clients' 1 MiB password messages),
    or after (one message over max_message_size; pipelined queries whose answers are never
    read; CopyData into a COPY)."""
    big = struct.pack("!i", 2**30)
    if not logged_in:
        password = startup_packet(USER) + b"p" + big
        return [
            flood(sidecar, "startup packet of 1 GiB", big + struct.pack("!i", 196608), b"x" * 4096, False),
            flood(sidecar, "password message of 1 GiB", password, b"x" * 4096, False),
        ] + ([flood_unauthenticated(sidecar)] if authenticates else [])
    copy = query("CREATE TEMP TABLE fz_flood (a text); COPY fz_flood FROM STDIN")
    return [
        flood(sidecar, "query of 1 GiB", b"Q" + big, b"x" * 4096, True),
        flood(sidecar, "pipelined queries, answers unread", b"", query("SELECT repeat('x', 1000)"), True),
        flood(sidecar, "CopyData into COPY FROM STDIN", copy, message(b"d", b"y" * 4000 + b"\n"), True),
    ]


# ---------------------------------------------------------------------------------------------
# Watching the sidecar
# ---------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class SidecarWatch:
    """Log lines that betray a bug (a traceback), and RSS over `baseline + headroom`."""

    def __init__(self, sidecar: SidecarProcess, headroom_mib: float = 64.0) -> None:
        self.sidecar = sidecar
        self.offset = sidecar.log_offset()
        self.baseline = rss_mib(sidecar.pid)
        self.bound = self.baseline + headroom_mib
        self.peak = self.baseline

    def problems(self) -> list[tuple[str, str]]:
        """(kind, detail) for each new bad log line and for RSS over the bound."""
        found: list[tuple[str, str]] = []
        if not self.sidecar.is_running():
            return [("sidecar exited", f"code {self.sidecar.poll()}: {self.sidecar.log_tail()}")]
        text = self.sidecar.log_text()
        cut = text.rfind("\n", self.offset) + 1  # whole lines only: a traceback may be mid-write
        new, self.offset = text[self.offset : cut], max(self.offset, cut)
        lines = new.splitlines()
        for n, line in enumerate(lines):
            if line.startswith("Traceback"):
                # The exception is the first line after the frames (which are indented).
                last = next((x for x in lines[n + 1 :] if x and not x[0].isspace()), "?")
                found.append((f"log: traceback ending in {last.split(':')[0]}", "\n".join(lines[n : n + 40])))
            elif "event=client_internal_error" in line:
                # The client gets XX000 for what was its own bad input: a bug even without traceback.
                found.append((f"log: client_internal_error {line.partition('error=')[2][:60]}", line[:300]))
            elif "Fatal error on transport" in line:
                found.append(("log: Fatal error on transport", line))
            elif "Exception" in line and not line.startswith(" "):
                found.append(("log: line with 'Exception'", line[:300]))
        rss = rss_mib(self.sidecar.pid)
        self.peak = max(self.peak, rss)
        if rss > self.bound:
            found.append(("sidecar RSS above the bound", f"{rss:.0f} MiB > {self.bound:.0f} MiB"))
        return found


# ---------------------------------------------------------------------------------------------
# The well-behaved client
# ---------------------------------------------------------------------------------------------


@dataclass
class Bystander:
    """A psycopg client that loops queries with known answers beside the fuzzer.

    Every iteration: ``SELECT $1::int + 1``; its own parameters (application_name, DateStyle)
    unchanged; a write to its own table, then the row read back. With `spooling` (an outage: no
    reads, the write is spooled) only the write, acknowledged with ``INSERT 0 1``. It reconnects
    every 20 iterations, so it also meets server connections fuzzed sessions used before (stale
    state shows there).
    """

    dsn: str
    table: str
    spooling: bool = False
    answers: int = 0
    failures: list[str] = field(default_factory=list)
    reported: int = 0  # failures already handed to the fuzzer's findings
    acked: list[str] = field(default_factory=list)  # ids of acknowledged writes
    busy_since: float | None = None  # monotonic start of the request in progress
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Bystander:
        self._thread = threading.Thread(target=self._run, name="fuzz-bystander", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ANSWER_TIMEOUT + 10)
            if self._thread.is_alive():
                self.failures.append(f"a request unanswered for {ANSWER_TIMEOUT + 10:g}s at the end")

    def hung(self) -> str | None:
        since = self.busy_since
        if since is not None and time.monotonic() - since > ANSWER_TIMEOUT:
            return f"bystander request unanswered for {time.monotonic() - since:.0f}s"
        return None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        self.busy_since = time.monotonic()
        try:
            return fn()
        finally:
            self.busy_since = None

    def _run(self) -> None:
        rng = random.Random(18)
        conn: psycopg.Connection[Any] | None = None
        i = 0
        while not self._stop.is_set():
            try:
                if conn is None or i % 20 == 0:
                    if conn is not None:
                        conn.close()
                    conn = self._call("connect", lambda: psycopg.connect(
                        self.dsn, autocommit=True, application_name="fuzz-bystander", connect_timeout=10
                    ))  # fmt: skip
                self._iteration(conn, rng, i)
            except psycopg.Error as exc:
                self.failures.append(f"iteration {i}: {type(exc).__name__} {exc.sqlstate}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            i += 1
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def _iteration(self, conn: psycopg.Connection[Any], rng: random.Random, i: int) -> None:
        if not self.spooling:
            self._reads(conn, rng, i)
        ident = f"b-{i}-{uuid.uuid4().hex[:8]}"
        tag = self._call("insert", lambda: conn.execute(
            f"INSERT INTO {self.table} (id) VALUES (%s)", (ident,)
        ).statusmessage)  # fmt: skip
        if tag != "INSERT 0 1":
            self.failures.append(f"iteration {i}: INSERT answered {tag!r}")
            return
        self.acked.append(ident)
        if not self.spooling:
            got = self._call("read back", lambda: conn.execute(
                f"SELECT count(*) FROM {self.table} WHERE id = %s", (ident,)
            ).fetchone())  # fmt: skip
            self._expect(i, "read back", got, (1,))
        self.answers += 1

    def _reads(self, conn: psycopg.Connection[Any], rng: random.Random, i: int) -> None:
        n = rng.randrange(-(2**30), 2**30)
        row = self._call("select", lambda: conn.execute("SELECT %s::int + 1", (n,)).fetchone())
        self._expect(i, "SELECT $1::int + 1", row, (n + 1,))
        for name, want in (("application_name", "fuzz-bystander"), ("DateStyle", "ISO, MDY")):
            got = conn.info.parameter_status(name)
            if got != want:
                self.failures.append(f"iteration {i}: ParameterStatus {name}={got!r}, expected {want!r}")
        shown = self._call("show", lambda: conn.execute("SHOW application_name").fetchone())
        self._expect(i, "SHOW application_name", shown, ("fuzz-bystander",))

    def _expect(self, i: int, what: str, got: object, want: object) -> None:
        if got != want:
            self.failures.append(f"iteration {i}: {what} answered {got!r}, expected {want!r}")
