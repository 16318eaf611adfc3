"""A small HTTP server in a thread: GET / (the page) and GET /status.json?since=N (the data)."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..cluster import free_port
from .page import PAGE

# since -> the JSON document; `since` is how many order samples the page already has.
Provider = Callable[[int], dict[str, Any]]


class StatusServer:
    def __init__(self, provider: Provider, preferred_port: int = 8081) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/":
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif url.path == "/status.json":
                    try:
                        since = int(urllib.parse.parse_qs(url.query).get("since", ["0"])[0])
                    except ValueError:
                        since = 0
                    try:
                        body = json.dumps(outer.provider(max(0, since))).encode()
                    except Exception as exc:  # a status page must not die with its subject
                        body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                    self._send(200, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found: try / or /status.json\n")

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the page polls every second; logging that would drown the demo's output

        self.provider = provider
        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", preferred_port), Handler)
        except OSError:
            self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="status-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
