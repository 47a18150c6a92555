"""The chat widget in real headless Chromium (Debian's ``chromium``, driven by Playwright) against
the real app: daphne serving ``config.asgi`` over the test database, the real embedding model, the
real GGUF model, the demo knowledge base ingested for real.

Skipped with a reason when Chromium is missing, unless ``REQUIRE_BROWSER=1`` (CI), which makes that
a failure. Chromium is found at ``CHROMIUM_PATH`` (default ``/usr/bin/chromium``).

Each test drives the browser with Playwright's async API inside ``asyncio.run`` and checks the
database after it returns: the sync API would keep an event loop on the test's thread, where Django
refuses database calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chat.models import Conversation
from knowledge.models import Chunk

ROOT = Path(__file__).resolve().parents[2]
DEMO_KNOWLEDGE_BASE = ROOT / "demo" / "knowledge_base"
CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ANSWER_TIMEOUT_MS = 180_000
XSS = "<img src=x onerror=alert(1)>"

# ``django_db`` makes pytest-django create the test database (the live server's); each test runs in a
# transaction of its own that is rolled back, while the module's knowledge base is committed.
pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

# JavaScript run in the page: the widget's shadow root, and whether its last answer has finished.
SHADOW = "document.querySelector('supportbot-widget').shadowRoot"
LAST_ANSWER_DONE = f"""() => {{
  const answers = {SHADOW}.querySelectorAll('.msg.assistant');
  return answers.length > 0 && !answers[answers.length - 1].hasAttribute('aria-busy');
}}"""


# --- fixtures --------------------------------------------------------------------------------------


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
    where the live server reads it. Afterwards everything the module's tests stored is removed."""
    from django.db import connection

    from chat.models import ModelVersion
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_server_url(demo_knowledge_base, tmp_path_factory) -> str:
    """daphne serving the project (HTTP, websockets, static files) on the test database, in a
    subprocess (``tests.browser.asgi_app``); its log is shown if it fails to start."""
    from django.db import connection

    database = connection.settings_dict["NAME"]
    port = _free_port()
    log_path = tmp_path_factory.mktemp("live-server") / "daphne.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tests.browser.asgi_app:application"],
            cwd=ROOT, env={**os.environ, "LIVE_SERVER_DATABASE_NAME": database}, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the live server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class PageWatch:
    """What a page did besides rendering: dialogs opened (``alert``), uncaught errors, websocket frames
    received (parsed JSON) and every URL requested."""

    def __init__(self, page):
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.frames: list[dict] = []
        self.requests: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: self.frames.append(json.loads(payload))))

    async def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def frame_types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


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


async def open_widget(page):
    await page.get_by_role("button", name="Open Tidewater Help chat").click()
    return page.get_by_role("dialog", name="Tidewater Help chat")


async def ask(page, question: str) -> None:
    """Type ``question`` into the widget, send it with Enter, and wait for the answer to finish."""
    box = page.get_by_role("textbox", name="Your question")
    await box.fill(question)
    await box.press("Enter")
    await page.wait_for_function(LAST_ANSWER_DONE, timeout=ANSWER_TIMEOUT_MS)


async def stored_conversation(page) -> dict:
    """The widget's saved ``{"id", "token"}``."""
    return await page.evaluate(
        "() => JSON.parse(Object.entries(localStorage).find(([key]) => key.startsWith('supportbot:'))[1])"
    )


# --- tests -----------------------------------------------------------------------------------------


def test_demo_page_loads_the_widget_in_a_shadow_root_the_page_css_cannot_reach(browse):
    async def scenario(page, watch):
        # given the demo page, whose own CSS styles every button hot pink with a dashed red border
        launcher = page.get_by_role("button", name="Open Tidewater Help chat")
        seen = {
            "launcher visible": await launcher.is_visible(),
            "in shadow root": await page.evaluate(f"() => {SHADOW}.querySelector('.launcher') !== null"),
            "launcher colour": await launcher.evaluate("b => getComputedStyle(b).backgroundColor"),
            "launcher border": await launcher.evaluate("b => getComputedStyle(b).borderStyle"),
            "page button colour": await page.get_by_role("button", name="Shop the autumn collection").evaluate(
                "b => getComputedStyle(b).backgroundColor"),
        }
        # when it is opened
        panel = await open_widget(page)
        seen["panel visible"] = await panel.is_visible()
        seen["focus when open"] = await page.evaluate(f"() => {SHADOW}.activeElement.getAttribute('aria-label')")
        # and closed with Escape
        await page.keyboard.press("Escape")
        seen["panel hidden"] = await panel.is_hidden()
        seen["focus when closed"] = await page.evaluate(f"() => {SHADOW}.activeElement.className")
        seen["errors"] = watch.errors
        return seen

    # then the launcher keeps its own look, the panel opens with the question box focused, and
    # Escape closes it with the focus back on the launcher
    assert browse(scenario) == {
        "launcher visible": True,
        "in shadow root": True,
        "launcher colour": "rgb(15, 92, 110)",
        "launcher border": "none",
        "page button colour": "rgb(255, 105, 180)",
        "panel visible": True,
        "focus when open": "Your question",
        "panel hidden": True,
        "focus when closed": "launcher",
        "errors": [],
    }


def test_a_question_streams_an_answer_whose_citation_opens_its_passage(browse):
    async def scenario(page, watch):
        # given the open widget, recording every text the answer bubble shows while it streams
        await open_widget(page)
        await page.evaluate(f"""() => {{
          window.__shown = [];
          new MutationObserver(() => {{
            const streaming = {SHADOW}.querySelector('.msg.assistant[aria-busy] .body');
            if (streaming) window.__shown.push(streaming.textContent);
          }}).observe({SHADOW}.querySelector('.messages'), {{subtree: true, childList: true, characterData: true}});
        }}""")
        # when the customer asks about shipping
        await ask(page, "How long does shipping take?")
        bubble = page.locator("supportbot-widget .msg.assistant").last
        result = {"shown": await page.evaluate("() => window.__shown"),
                  "bubble": await bubble.locator(".body").text_content(), "frames": list(watch.frames)}
        citations = watch.frames[-1]["type"] == "chat.done" and watch.frames[-2].get("citations")
        if not citations:
            return result
        # and opens the first citation from the answer's source list
        first = citations[0]
        source_button = bubble.get_by_role("button", name=f"Source {first['n']}: {first['source_title']}").last
        result["source button"] = await source_button.text_content()
        await source_button.click()
        region = page.get_by_role("region", name=first["source_title"])
        await region.locator("mark").wait_for()
        result["passage title"] = await region.get_by_role("heading").text_content()
        result["highlighted"] = await region.locator("mark").text_content()
        result["passage text"] = await region.locator(".passage-body").text_content()
        # and goes back to the chat
        await region.get_by_role("button", name="Back to chat").click()
        result["passage hidden after back"] = await region.is_hidden()
        result["errors"] = watch.errors
        return result

    result = browse(scenario)

    # then the answer arrived as several chat.token frames, and the bubble grew with them
    frames = result["frames"]
    assert [frame["type"] for frame in frames][-2:] == ["chat.citations", "chat.done"]
    tokens = [frame["text"] for frame in frames if frame["type"] == "chat.token"]
    answer = frames[-1]["text"]
    assert len(tokens) >= 2 and "".join(tokens).strip() == answer
    shown = [text for text in result["shown"] if text]
    assert len(set(shown)) >= 2 and all(answer.startswith(text.strip()) for text in shown)
    assert result["bubble"] == answer

    # and its first citation opened the cited chunk, highlighted, under its source's title
    citations = frames[-2]["citations"]
    assert citations, f"the answer cited nothing: {answer!r}"
    first = citations[0]
    chunk = Chunk.objects.select_related("source").get(pk=first["chunk_id"])
    assert result["source button"] == f"[{first['n']}] {chunk.source.title}"
    assert result["passage title"] == chunk.source.title
    assert result["highlighted"] == chunk.text
    assert chunk.text in result["passage text"]
    assert result["passage hidden after back"] is True
    assert result["errors"] == []


def test_a_message_with_markup_renders_as_text(browse):
    async def scenario(page, watch):
        # when the customer sends HTML that would run script if it were parsed
        await open_widget(page)
        await ask(page, XSS)
        message = page.locator("supportbot-widget .msg.user .body").last
        return {
            "text": await message.text_content(),
            "visible": await message.is_visible(),
            "images in widget": await page.evaluate(f"() => {SHADOW}.querySelectorAll('img').length"),
            "images in page": await page.evaluate("() => document.querySelectorAll('img').length"),
            "dialogs": watch.dialogs,
            "requests for x": [url for url in watch.requests if url.rstrip("/").endswith("/x")],
            "errors": watch.errors,
        }

    # then it shows as the literal text, and nothing was made or run from it
    assert browse(scenario) == {
        "text": XSS, "visible": True, "images in widget": 0, "images in page": 0, "dialogs": [],
        "requests for x": [], "errors": [],
    }


def test_talk_to_a_human_marks_the_conversation_as_needing_a_human(browse):
    async def scenario(page, watch):
        # given a conversation with one answered question
        await open_widget(page)
        await ask(page, "Do you ship internationally?")
        # when the customer asks for a person
        await page.get_by_role("button", name="Talk to a human").first.click()
        await page.locator("supportbot-widget .note", has_text="We've asked a person to join.").wait_for()
        return {
            "conversation": (await stored_conversation(page))["id"],
            "button disabled": await page.get_by_role("button", name="Human requested").is_disabled(),
        }

    result = browse(scenario)

    # then the widget says so, and the conversation waits for an agent in the database
    assert result["button disabled"] is True
    assert Conversation.objects.get(pk=result["conversation"]).status == "needs_human"


def test_the_conversation_survives_a_page_reload(browse):
    async def scenario(page, watch):
        # given an answered question
        await open_widget(page)
        await ask(page, "Do you ship internationally?")
        before = await page.locator("supportbot-widget .msg").all_text_contents()
        saved = await stored_conversation(page)
        # when the page is reloaded
        await page.reload()
        await open_widget(page)
        await page.locator("supportbot-widget .msg.assistant").first.wait_for()
        after = await page.locator("supportbot-widget .msg").all_text_contents()
        restored = await stored_conversation(page)
        # and another question is asked on the reconnected socket
        await ask(page, "How do I track my order?")
        count = await page.locator("supportbot-widget .msg").count()
        return before, saved, after, restored, count

    before, saved, after, restored, count = browse(scenario)

    # then the same conversation and its transcript came back, and the socket answers again
    assert restored == saved
    assert after == before and len(before) == 2
    assert count == 4
    assert Conversation.objects.get(pk=saved["id"]).messages.filter(role="user").count() == 2


# --- the widget's own behaviour, against a scripted websocket ----------------------------------------
# Playwright answers the widget's websocket itself (``page.route_web_socket``), so these tests can
# script what the real pipeline does only under load (chat.busy) or on network failures; HTTP still
# goes to the live server.


def test_busy_shows_retrying_and_sends_the_question_again_after_retry_after_s(browse):
    async def scenario(page, watch):
        received: list[tuple[float, dict]] = []

        def serve(ws):
            def on_message(message):
                frame = json.loads(message)
                received.append((time.monotonic(), frame))
                if len(received) == 1:  # the engine's queue is full the first time
                    ws.send(json.dumps({"type": "chat.busy", "retry_after_s": 1.5, "message": "busy"}))
                    return
                for piece in ["Ships in ", "3 to 5 days."]:
                    ws.send(json.dumps({"type": "chat.token", "text": piece}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 1, "abstained": False, "timings": {},
                                    "text": "Ships in 3 to 5 days."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        box = page.get_by_role("textbox", name="Your question")
        await box.fill("How long does shipping take?")
        await box.press("Enter")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="busy").wait_for()
        busy_text = await status.text_content()
        send_disabled_while_busy = await page.get_by_role("button", name="Send").is_disabled()
        await page.wait_for_function(LAST_ANSWER_DONE, timeout=30_000)
        return {
            "busy status": busy_text,
            "send disabled while busy": send_disabled_while_busy,
            "frames sent": [frame for _, frame in received],
            "retry after s": round(received[1][0] - received[0][0], 1) if len(received) > 1 else None,
            "answers": await page.locator("supportbot-widget .msg.assistant .body").all_text_contents(),
            "questions": await page.locator("supportbot-widget .msg.user .body").all_text_contents(),
            "status hidden after answer": await status.is_hidden(),
        }

    result = browse(scenario)

    # then the customer saw "busy, retrying", the same question went again after about 1.5 s, and the
    # answer shows once under the question shown once
    assert result["busy status"] == "The assistant is busy, retrying in 2 s…"
    assert result["send disabled while busy"] is True
    question = {"type": "chat.message", "text": "How long does shipping take?"}
    assert result["frames sent"] == [question, question]
    assert 1.4 <= result["retry after s"] <= 3.0
    assert result["answers"] == ["Ships in 3 to 5 days."]
    assert result["questions"] == ["How long does shipping take?"]
    assert result["status hidden after answer"] is True


def test_a_dropped_socket_reconnects_and_the_next_question_goes_through(browse):
    async def scenario(page, watch):
        connections = []

        def serve(ws):
            connections.append(ws)

            def on_message(message):
                ws.send(json.dumps({"type": "chat.token", "text": "Back online."}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 2, "abstained": False, "timings": {},
                                    "text": "Back online."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        await ask(page, "first question")
        # when the server drops the connection
        await connections[0].close(code=1012, reason="restart")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="reconnecting").wait_for()
        # then the widget reconnects by itself and the next question is answered on the new socket
        await page.wait_for_function(f"() => {SHADOW}.querySelector('.status').hidden", timeout=30_000)
        await ask(page, "second question")
        return len(connections), await page.locator("supportbot-widget .msg.assistant .body").all_text_contents()

    connections, answers = browse(scenario)

    assert connections == 2
    # the transcript reloaded from the server on reconnect (the scripted socket stored nothing), then
    # the second answer streamed in
    assert answers == ["Back online."]
