"""The transport a server linked for a replay writes to (`replay.ReplayClient`).

Interpreted, not compiled: a subclass of asyncio.Transport (a Python class), so that the server's
native `client.transport` field accepts it; its one real method hands the bytes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class ReplaySink(asyncio.Transport):
    def __init__(self, feed: Callable[[bytes | memoryview], None]) -> None:
        super().__init__()
        self._feed = feed

    def write(self, data: Any) -> None:
        self._feed(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
