"""A customer's widget as a Python client of a real web process: the HTTP API with ``requests`` and the
chat websocket with ``websockets``, doing what ``static/widget/widget.js`` does.

- ``start()``: ``POST /api/conversations/`` from the site's own origin.
- ``connect()``: open ``/ws/chat/<id>/`` offering the token as a subprotocol.
- ``ask(text)``: send ``chat.message`` and collect frames up to the answer's ``chat.done`` (or the
  first ``chat.error`` / ``chat.busy`` / ``chat.agent_active``).
- ``reconnect()``: after the socket dropped, as the widget's ``scheduleReconnect``: reload the
  transcript over HTTP, then open a new socket; while that fails, wait and try again, the delay doubling
  from 0.5 s up to ``RECONNECT_MAX_S``, until ``deadline_s``. Returns the attempts it took.
"""

from __future__ import annotations

import asyncio
import json
import time

import requests
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidHandshake

from chat.conversation_access import client_subprotocols

RECONNECT_MAX_S = 8.0
FINAL_FRAMES = {"chat.done", "chat.error", "chat.busy", "chat.agent_active", "chat.rate_limited"}


class WidgetClient:
    """One customer on ``base_url`` (``http://127.0.0.1:<port>``)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://", 1)
        self.conversation_id: str | None = None
        self.token: str | None = None
        self.socket = None

    def start(self) -> requests.Response:
        response = requests.post(f"{self.base_url}/api/conversations/", headers={"Origin": self.base_url}, timeout=30)
        if response.status_code == 201:
            self.conversation_id, self.token = response.json()["id"], response.json()["token"]
        return response

    def transcript(self) -> requests.Response:
        return requests.get(f"{self.base_url}/api/conversations/{self.conversation_id}/messages/",
                            headers={"Origin": self.base_url, "X-Conversation-Token": self.token}, timeout=30)

    async def connect(self) -> None:
        """Open the socket; raises ``websockets``' ``InvalidHandshake`` / ``OSError`` when refused."""
        self.socket = await websocket_connect(f"{self.ws_url}/ws/chat/{self.conversation_id}/",
                                              subprotocols=client_subprotocols(self.token),
                                              origin=self.base_url, open_timeout=30)

    async def ask(self, text: str, timeout_s: float = 120) -> list[dict]:
        """Send a question; return the frames received up to and including the final one."""
        await self.socket.send(json.dumps({"type": "chat.message", "text": text}))
        frames = []
        async with asyncio.timeout(timeout_s):
            while True:
                frame = json.loads(await self.socket.recv())
                frames.append(frame)
                if frame["type"] in FINAL_FRAMES:
                    return frames

    async def next_frame(self, timeout_s: float = 30) -> dict:
        """The next frame the server sends."""
        async with asyncio.timeout(timeout_s):
            return json.loads(await self.socket.recv())

    async def wait_closed(self, timeout_s: float = 60) -> int | None:
        """Wait until the server closes the socket (frames meanwhile are dropped); its close code."""
        async with asyncio.timeout(timeout_s):
            try:
                while True:
                    await self.socket.recv()
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    async def reconnect(self, deadline_s: float = 120) -> list[str]:
        """Reload the transcript and reopen the socket, backing off while either fails. Returns what
        each failed attempt got (e.g. ``"transcript 500"``, ``"socket InvalidStatus"``)."""
        failures: list[str] = []
        delay = 0.5
        deadline = time.monotonic() + deadline_s
        while True:
            await asyncio.sleep(delay)
            try:
                response = await asyncio.to_thread(self.transcript)
                if response.status_code != 200:
                    failures.append(f"transcript {response.status_code}")
                else:
                    await self.connect()
                    return failures
            except (InvalidHandshake, InvalidStatus, OSError, ConnectionClosed, asyncio.TimeoutError) as error:
                failures.append(f"socket {type(error).__name__}")
            if time.monotonic() > deadline:
                raise AssertionError(f"could not reconnect in {deadline_s} s: {failures}")
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
