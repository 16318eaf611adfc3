"""A real browser books a table at the Cafe during a full database outage (ARCHITECTURE.md, P5).

Debian's headless Chromium, driven by selenium through chromedriver, uses the Cafe's form like a
person would. The stack is the demo's (demo_app.stack): a1/a2/b1, pgsidecar with a SQLite spool,
the Cafe on a local port. The app is used once while the database is up (SQLAlchemy connects and
introspects the server then; the sidecar keeps those answers for the outage), then the writer
crashes and the standbys stay in recovery: no writer anywhere. The booking must be acknowledged
(the thank-you page with its reference), and after the writer returns and the spool replays it
must be in the reservations list and in the database exactly once.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from demo_app.cafe import order_digest
from demo_app.stack import DemoStack, SidecarStatus
from tests.harness.pg import APP_DB, Topology, free_port

pytestmark = pytest.mark.timeout(180)

HOLD_TIMEOUT = 2.0


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' or '.join(names)} not found: `make test` installs Debian's chromium and chromium-driver",
                pytrace=False)  # fmt: skip


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = _binary("chromium", "chromium-browser")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path: selenium must not try to download one (no internet here).
    driver = webdriver.Chrome(service=Service(executable_path=_binary("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def stack(fresh_topology: Topology, tmp_path: Path) -> Iterator[DemoStack]:
    with DemoStack(spool="sqlite", topology=fresh_topology, workdir=tmp_path / "stack",
                   cafe_port=free_port(), hold_timeout=f"{HOLD_TIMEOUT:g}s", say=print) as st:  # fmt: skip
        yield st


def wait_sidecar(stack: DemoStack, what: str, check, timeout: float = 30.0) -> SidecarStatus:
    assert stack.sidecar is not None
    deadline = time.monotonic() + timeout
    while True:
        status = stack.sidecar.status()
        if check(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"sidecar: {what} not within {timeout}s: {status}\n{stack.sidecar.log_tail()}")
        time.sleep(0.1)


def book(driver: WebDriver, base_url: str, name: str, people: int, when: str, notes: str) -> None:
    driver.get(base_url + "/")
    driver.find_element(By.ID, "name").send_keys(name)
    party = driver.find_element(By.ID, "people")
    party.clear()
    party.send_keys(str(people))
    # Typing into a datetime-local field depends on the browser's locale; setting it does not.
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "when"), when)
    driver.find_element(By.ID, "notes").send_keys(notes)
    driver.find_element(By.ID, "book").click()


def test_booking_during_full_outage_is_acknowledged_and_kept(
    stack: DemoStack, browser: WebDriver, fresh_topology: Topology, tmp_path: Path
) -> None:
    assert stack.cafe is not None
    base = stack.cafe.url
    topo = fresh_topology

    # While up: one booking through the browser, as any visitor before the outage.
    before = f"Early Bird {uuid.uuid4().hex[:6]}"
    book(browser, base, before, 2, "2031-08-01T12:00", "")
    WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.ID, "confirmation")))
    assert stack.sidecar is not None

    # Full outage: the writer crashes; a2 and b1 stay up but in recovery, so no writer exists.
    topo.a1.crash()
    wait_sidecar(stack, "outage", lambda s: s.state == "outage")

    name, people, when, notes = f"Outage Guest {uuid.uuid4().hex[:6]}", 3, "2031-08-01T19:30", "by the window"
    digest = order_digest(name, people, datetime(2031, 8, 1, 19, 30, tzinfo=UTC), notes)
    book(browser, base, name, people, when, notes)
    # The thank-you page, or the app's error page saying why the booking was refused.
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.ID, "confirmation") or d.find_elements(By.ID, "error")
    )
    shot = tmp_path / "cafe-booking-during-outage.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    refused = browser.find_elements(By.ID, "error")
    assert not refused, f"booking during the outage refused: {refused[0].text}\n{stack.sidecar.log_tail()}"
    assert browser.find_element(By.ID, "ref").text == digest
    assert wait_sidecar(stack, "spooled", lambda s: s.spool_pending >= 1).spool_pending >= 1

    # Recovery: the writer comes back; the sidecar replays the spool, then serves traffic again.
    topo.a1.start()
    wait_sidecar(stack, "replayed and up", lambda s: s.state == "up" and s.spool_pending == 0)

    browser.get(base + "/orders")
    table = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.ID, "orders")))
    shot = tmp_path / "cafe-orders-after-recovery.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert name in table.text and before in table.text

    with psycopg.connect(topo.a1.dsn(dbname=APP_DB), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT ordrdgst, ordrppl, ordrtxt FROM cafe.ordersraw WHERE ordrname = %s", (name,)
        ).fetchall()
        applied = conn.execute(
            "SELECT count(*) FROM cafe.orders_applied WHERE ordrdgst = %s", (digest,)
        ).fetchone()
    assert rows == [(digest, people, notes)]
    assert applied == (1,), "the spooled booking was applied more than once"
