"""What the browser tests do in a page: the widget's shadow root, asking a question and waiting for
its answer, and ``PageWatch`` (dialogs, uncaught errors, websocket frames and requests of a page)."""

from __future__ import annotations

import json
from urllib.parse import urlparse

CHROMIUM_ARGS = [
    "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ANSWER_TIMEOUT_MS = 180_000
XSS = "<img src=x onerror=alert(1)>"

# JavaScript run in the page: the widget's shadow root, and whether its last answer has finished.
SHADOW = "document.querySelector('supportbot-widget').shadowRoot"
LAST_ANSWER_DONE = f"""() => {{
  const answers = {SHADOW}.querySelectorAll('.msg.assistant');
  return answers.length > 0 && !answers[answers.length - 1].hasAttribute('aria-busy');
}}"""


class PageWatch:
    """What a page did besides rendering: dialogs opened (``alert``), uncaught errors, websocket frames
    received (parsed JSON) and every URL requested (websocket URLs included). A static file (``/static/...``) answered with an
    HTTP error or failing to load counts as an error too (``"static file <path>: ..."``), so a test
    asserting no errors fails on a missing asset of the production server."""

    def __init__(self, page):
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.frames: list[dict] = []
        self.requests: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", self._response)
        # A 404 for a stylesheet or script is often reported only as a failed request (Chromium aborts
        # an HTML error page of the wrong type under "X-Content-Type-Options: nosniff").
        page.on("requestfailed", self._request_failed)
        page.on("websocket", self._websocket)

    def _websocket(self, ws) -> None:
        self.requests.append(ws.url)
        ws.on("framereceived", lambda payload: self.frames.append(json.loads(payload)))

    def _response(self, response) -> None:
        path = urlparse(response.url).path
        if path.startswith("/static/") and response.status >= 400:
            self.errors.append(f"static file {path}: HTTP {response.status}")

    def _request_failed(self, request) -> None:
        path = urlparse(request.url).path
        if path.startswith("/static/"):
            self.errors.append(f"static file {path}: {request.failure}")

    async def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def frame_types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


async def open_widget(page):
    """Open the demo page's widget; returns its dialog."""
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


async def save_pages(pages: dict, folder) -> list[str]:
    """Write each page's URL, HTML and a screenshot to ``folder`` (for a failing test's report);
    returns the file names written. ``pages`` maps a name to a Playwright page."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, page in pages.items():
        try:
            (folder / f"{name}.html").write_text(f"<!-- {page.url} -->\n" + await page.content(), encoding="utf-8")
            await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
            written += [f"{name}.html", f"{name}.png"]
        except Exception as error:  # a closed page: note it and go on
            (folder / f"{name}.error.txt").write_text(repr(error), encoding="utf-8")
    return written
