"""`WriterCell`: the writer as the topology monitor last published it.

The monitor (interpreted) keeps its `writer` here; the pool (compiled) reads it at every checkout,
natively, because this class is compiled too (ARCHITECTURE.md, The compiled data path, rule 6).
Its own module so that topology.py and pool.py share it without either importing the server
module for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar_config import Endpoint


class WriterCell:
    """The writer (None while unknown)."""

    __slots__ = ("writer",)

    def __init__(self) -> None:
        self.writer: Endpoint | None = None
