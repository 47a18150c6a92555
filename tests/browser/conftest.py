"""Browser-test fixtures: Debian's Chromium (driven by Playwright), the demo knowledge base ingested
for real into the test database, and daphne serving the project on it (``tests.live_server``).

Skipped with a reason when Chromium is missing, unless ``REQUIRE_BROWSER=1`` (CI), which makes that
a failure. Chromium is found at ``CHROMIUM_PATH`` (default ``/usr/bin/chromium``).

The knowledge base and the live server are per test module: each module starts from an empty
database (everything its tests and the live server stored is removed afterwards), so the other test
modules, which expect an empty database, never see it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.browser.pages import CHROMIUM_ARGS, PageWatch
from tests.live_server import LiveServerError, live_server

ROOT = Path(__file__).resolve().parents[2]
DEMO_KNOWLEDGE_BASE = ROOT / "demo" / "knowledge_base"
CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """Debian's Chromium, or a skip (a failure with ``REQUIRE_BROWSER=1``)."""
    problem = None
    if not Path(CHROMIUM_PATH).exists():
        problem = f"Chromium not found at {CHROMIUM_PATH} (apt-get install chromium, or set CHROMIUM_PATH)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "the playwright Python package is not installed"
    if problem:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(problem + "; REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(problem)
    return CHROMIUM_PATH


@pytest.fixture(scope="module")
def demo_knowledge_base(chromium_path, django_db_setup, django_db_blocker):
    """The demo knowledge base ingested (parsed, chunked, embedded) and committed to the test database,
    where the live server reads it. Afterwards everything the module's tests and the live server
    stored is removed: conversations (with their messages, feedback and corrections), sources, model
    versions, users and sessions."""
    from django.contrib.auth.models import User
    from django.contrib.sessions.models import Session
    from django.db import connection

    from chat.models import Conversation, ModelVersion
    from knowledge import services
    from knowledge.models import Source

    with django_db_blocker.unblock():
        # never write to (or clean up) a development database
        assert connection.settings_dict["NAME"] == connection.settings_dict["TEST"]["NAME"]
        result = services.sources_register_paths([DEMO_KNOWLEDGE_BASE], enqueue=False)
        for source in result.queued:
            assert services.document_ingest(source.pk).status == "ingested"
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            Conversation.objects.all().delete()
            Source.objects.all().delete()
            ModelVersion.objects.all().delete()
            Session.objects.all().delete()
            User.objects.all().delete()


@pytest.fixture(scope="module")
def live_server_url(demo_knowledge_base, tmp_path_factory) -> str:
    """daphne serving the project (HTTP, websockets, static files) on the test database, in a
    subprocess; its log is shown if it fails to start."""
    from django.db import connection

    log_path = tmp_path_factory.mktemp("live-server") / "daphne.log"
    try:
        with live_server(connection.settings_dict["NAME"], log_path=log_path) as server:
            yield server.url
    except LiveServerError as error:
        pytest.fail(str(error))


@pytest.fixture
def browse(chromium_path, live_server_url):
    """``browse(scenario)`` opens the demo page in a fresh headless Chromium (empty localStorage) and
    returns ``await scenario(page, watch)``; the browser is closed afterwards."""

    async def session(scenario):
        from playwright.async_api import async_playwright

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 760})
                watch = PageWatch(page)
                await page.goto(live_server_url + "/")
                return await scenario(page, watch)
            finally:
                await browser.close()

    return lambda scenario: asyncio.run(session(scenario))
