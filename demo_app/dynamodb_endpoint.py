"""`python -m demo_app.dynamodb_endpoint PORT`: moto's DynamoDB on 127.0.0.1:PORT, one request at
a time, for the demo's spool.

moto is an emulator: run threaded, its `transact_write_items` iterates a table's items while
another request thread adds to them, and fails with "dictionary changed size during iteration"
(an HTTP 500 and a traceback, where DynamoDB would have applied both). The sidecar's conditional
puts and the replayer's lease run concurrently in the drill, so requests are served one at a time
here: moto runs on one core under the GIL anyway, so little is lost. Run as its own process, its
request log and any traceback go to the log file the demo names, not the demo's console.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def serialized(app: WsgiApp) -> WsgiApp:
    """`app` with one request in it at a time (its response body produced inside the lock too)."""
    lock = threading.Lock()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    return handle


def main(argv: list[str]) -> int:
    port = int(argv[0])
    app: WsgiApp = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", port, serialized(app), threaded=True)
    print(f"moto DynamoDB endpoint on http://127.0.0.1:{port} (one request at a time)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
