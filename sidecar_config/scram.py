"""SCRAM verifiers as configured: PostgreSQL's `SCRAM-SHA-256$...` form, parsed and validated.

Here, not in `proxy.protocol.auth`, so that the config package imports nothing of `proxy`;
`proxy.protocol.auth.ScramVerifier` extends this class with what the data path needs (deriving a
verifier from a password with scramp).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Self


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """What a server needs to check a SCRAM proof (PostgreSQL's `SCRAM-SHA-256$...` form)."""

    salt: bytes = field(repr=False)
    # The keys let anyone holding them impersonate the server or mount an offline attack.
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int

    PREFIX = "SCRAM-SHA-256$"

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).

        Raises ValueError saying what is wrong; as PostgreSQL's own parser, it insists on a
        positive iteration count, a salt and two 32-byte SHA-256 keys.
        """
        form = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
        if not text.startswith(cls.PREFIX):
            raise ValueError(f"not a SCRAM verifier; {form}")
        head, sep, keys = text[len(cls.PREFIX) :].partition("$")
        iterations_text, sep1, salt_text = head.partition(":")
        stored_text, sep2, server_text = keys.partition(":")
        if not (sep and sep1 and sep2):
            raise ValueError(f"malformed SCRAM verifier; {form}")
        if not iterations_text.isascii() or not iterations_text.isdigit() or int(iterations_text) < 1:
            raise ValueError("malformed SCRAM verifier: the iteration count must be a positive integer")
        try:
            salt = base64.b64decode(salt_text, validate=True)
            stored_key = base64.b64decode(stored_text, validate=True)
            server_key = base64.b64decode(server_text, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise ValueError("malformed SCRAM verifier: salt and keys must be base64") from None
        if not salt or len(stored_key) != 32 or len(server_key) != 32:
            raise ValueError("malformed SCRAM verifier: expected a salt and two 32-byte SHA-256 keys")
        return cls(salt, stored_key, server_key, int(iterations_text))

    @classmethod
    def is_verifier(cls, text: str) -> bool:
        return text.startswith(cls.PREFIX)
