"""The admin as an operator uses it: real headless Chromium, real `manage.py serve`."""

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Server, manage, migrated_sqlite

PASSWORD = "operator-password-for-tests"

pytestmark = pytest.mark.process

# Three sessions: `deep` holds 12 messages, `shallow` 2, `idle` none.
SEED = """
from mailbox import store
for name, n in (("deep", 12), ("shallow", 2), ("idle", 0)):
    box = store.create_session()
    for i in range(n):
        store.deliver(box.session_id, "order.shipped", {"order": i})
    print(name, box.session_id)
"""


def sync_playwright() -> Any:
    """Return Playwright's sync entry point, or fail (CI) or skip (locally) without it."""
    try:
        from playwright.sync_api import sync_playwright as entry
    except ImportError:
        entry = None  # type: ignore[assignment]
    if entry is not None and CHROMIUM.exists():
        return entry
    why = "needs Debian's chromium (apt-get install chromium) and playwright (requirements-dev)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Server, dict[str, str], dict[str, str]]]:
    """Serve a migrated database with an operator account and three sessions."""
    env = migrated_sqlite(tmp_path / "db.sqlite3")
    account = {
        "DJANGO_SUPERUSER_USERNAME": "operator",
        "DJANGO_SUPERUSER_EMAIL": "operator@example.com",
        "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
    }
    created = manage("createsuperuser", "--noinput", env={**env, **account})
    assert created.returncode == 0, created.stderr
    seeded = manage("shell", "-v", "0", "-c", SEED, env=env)
    assert seeded.returncode == 0, seeded.stderr
    sessions = dict(line.split() for line in seeded.stdout.splitlines() if line.strip())

    server = Server({**env, "SERVER_LOG": str(tmp_path / "server.log")}).start()
    try:
        yield server, env, sessions
    finally:
        server.stop()


def test_an_operator_finds_the_deep_mailbox_and_expires_it_in_a_real_browser(site):
    playwright_entry = sync_playwright()
    server, env, sessions = site
    ARTIFACTS.mkdir(exist_ok=True)
    static: list[tuple[str, int]] = []

    with playwright_entry() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.on(
                "response",
                lambda r: static.append((r.url, r.status)) if "/static/" in r.url else None,
            )

            # Log in, and reach the overview from the admin index.
            page.goto(server.url + "/admin/login/?next=/admin/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url(re.compile(r"/admin/$"))
            page.click("text=Mailbox overview")
            page.wait_for_url(re.compile(r"/overview/$"))

            assert page.locator("#queues .figure").first.inner_text() == "14"
            assert page.locator("#sessions").inner_text().count("mailbox") >= 1
            deepest = page.locator("#deepest tbody tr, #deepest tr:has(td)").first
            assert sessions["deep"] in deepest.inner_text()
            assert page.locator("svg.depth-chart rect").count() == 5
            page.screenshot(path=str(ARTIFACTS / "admin-overview.png"), full_page=True)

            # Filter the mailboxes with a backlog: the idle session drops out.
            page.goto(server.url + "/admin/mailbox/mailbox/")
            page.click("#changelist-filter a[href*='backlog=yes']")
            page.wait_for_url(re.compile(r"backlog=yes"))
            listed = page.locator("#result_list").inner_text()
            assert sessions["deep"] in listed and sessions["shallow"] in listed
            assert sessions["idle"] not in listed

            # Expire the deep mailbox's messages now.
            row = page.locator(f"#result_list tr:has-text('{sessions['deep']}')")
            row.locator("input.action-select").check()
            page.select_option("select[name=action]", "expire_now")
            page.click("button[name=index]")
            message = page.locator("ul.messagelist").inner_text()
            assert "12 queued messages in 1 mailboxes now expire" in message
            page.screenshot(path=str(ARTIFACTS / "admin-mailboxes.png"), full_page=True)
        finally:
            browser.close()

    # The admin's own stylesheets and scripts came from the server.
    assert any(url.endswith("/static/admin/css/base.css") for url, _ in static), static
    assert all(status == 200 for _, status in static), static

    # The next sweep drops exactly what the action expired.
    swept = manage("expire_mailboxes", env=env)
    assert swept.returncode == 0, swept.stderr
    assert "dropped ttl=12 transport-closed=0" in swept.stdout
