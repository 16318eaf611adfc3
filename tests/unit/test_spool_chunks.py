"""Which spooled records may share one replay transaction (proxy.spool.replay.chunks)."""

from __future__ import annotations

from proxy.spool.record import SpooledStatement, SpoolRecord
from proxy.spool.replay import chunks


def _record(i: int, user: str = "app", tz: str = "UTC", app: str = "a") -> SpoolRecord:
    stmt = SpooledStatement("INSERT INTO t VALUES ($1)", (23,), (0,), (str(i).encode(),), "INSERT 0 1")
    settings = {"TimeZone": tz, "application_name": app}
    return SpoolRecord(f"{i:020d}", float(i), user, "appdb", settings, (stmt,))


def test_consecutive_records_with_equal_meaning_share_a_chunk_up_to_its_size() -> None:
    records = [_record(i, app=f"client-{i % 3}") for i in range(7)]
    got = [[r.id for r in c] for c in chunks(records, 3)]
    assert got == [[r.id for r in records[0:3]], [r.id for r in records[3:6]], [records[6].id]]


def test_a_different_user_or_setting_starts_a_new_chunk_and_order_is_kept() -> None:
    records = [_record(0), _record(1, tz="Europe/Paris"), _record(2, tz="Europe/Paris"), _record(3, user="b"),
               _record(4)]  # fmt: skip
    got = [[r.id for r in c] for c in chunks(records, 100)]
    assert got == [[records[0].id], [records[1].id, records[2].id], [records[3].id], [records[4].id]]
    assert [r for c in chunks(records, 100) for r in c] == records
