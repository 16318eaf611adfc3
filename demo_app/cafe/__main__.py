"""`CAFE_DSN=... python -m demo_app.cafe [PORT]`: the Cafe alone, on Flask's development server."""

from __future__ import annotations

import sys

from .app import create_app

if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
