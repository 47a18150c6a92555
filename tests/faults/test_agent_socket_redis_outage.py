"""Redis down under a running web process, for the agents' dashboard socket (``/ws/agent/``,
``chat.dashboard.consumers.AgentConsumer``): open sockets are closed with 4503, a new handshake is
refused, each with one WARNING line and no traceback, and a new socket works again once Redis is back,
without a restart.

As ``tests/faults/test_redis_outage.py`` (which checks the customer's socket and HTTP): a real daphne
(``tests.live_server``) on a PostgreSQL server and a Redis server of this test's own
(``tests.dedicated_servers``; the run's shared Redis is never stopped). The agents are users in the
"Agents" group of that database, signed in on the dashboard's login page with ``requests``; their
sockets carry the session cookie, as the dashboard page's do (``static/dashboard/dashboard.js``).
A refusal before acceptance is an HTTP 403 to the client whatever its close code (daphne answers any
close before ``accept`` so), so the handshake's 4503 is visible only as that 403 and its log line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid

import pytest
import requests
from channels_redis.core import RedisChannelLayer
from websockets.asyncio.client import ClientConnection, connect as websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat.notifications import AGENTS_CHANNEL_GROUP, inbox_event
from tests.dedicated_servers import dedicated_postgres, dedicated_redis
from tests.faults.test_redis_outage import log_records
from tests.live_server import ROOT, LiveServerError, live_server

DATABASE = "faults_agent_socket_redis_outage"
AGENTS = ("alice", "bob")
CLOSE_UNAVAILABLE = 4503  # chat.redis_outage.CLOSE_UNAVAILABLE, spelled out: this is the protocol
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
CREATE_AGENTS = (
    "from django.contrib.auth.models import Group, User\n"
    "from chat.access import AGENTS_GROUP\n"
    "agents = Group.objects.get_or_create(name=AGENTS_GROUP)[0]\n"
    f"for name in {AGENTS!r}:\n"
    "    User.objects.create_user(name, password='pw-' + name).groups.add(agents)\n"
)


def agent_session(base_url: str, username: str) -> requests.Session:
    """A ``requests`` session signed in as ``username`` on the dashboard's login page (with its CSRF token)."""
    session = requests.Session()
    login = session.get(f"{base_url}/accounts/login/", timeout=30)
    signed_in = session.post(f"{base_url}/accounts/login/", timeout=30, data={
        "username": username, "password": "pw-" + username, "next": "/dashboard/",
        "csrfmiddlewaretoken": _CSRF.search(login.text).group(1)})
    assert signed_in.url == f"{base_url}/dashboard/", signed_in.text[:2000]
    return session


async def open_agent_socket(base_url: str, session: requests.Session) -> ClientConnection:
    """Open ``/ws/agent/`` as the dashboard page does: this site's origin, the session cookie. Raises
    ``websockets``' ``InvalidStatus`` when the handshake is refused."""
    return await websocket_connect(f"{base_url.replace('http://', 'ws://', 1)}/ws/agent/", origin=base_url,
                                   additional_headers={"Cookie": f"sessionid={session.cookies['sessionid']}"},
                                   open_timeout=30)


async def next_frame(socket: ClientConnection, timeout_s: float = 30) -> dict:
    """The next frame the server sends on ``socket``, decoded."""
    async with asyncio.timeout(timeout_s):
        return json.loads(await socket.recv())


async def until_closed(socket: ClientConnection, timeout_s: float = 60) -> dict:
    """Wait until the server closes ``socket``: ``{"frames": [...] received meanwhile, "close code": int | None}``."""
    frames = []
    async with asyncio.timeout(timeout_s):
        try:
            while True:
                frames.append(json.loads(await socket.recv()))
        except ConnectionClosed as closed:
            return {"frames": frames, "close code": closed.rcvd.code if closed.rcvd else None}


async def agents_hear(redis_url: str, sockets: list[ClientConnection]) -> list[dict]:
    """Send an ``inbox.changed`` event to the agents' group on ``redis_url`` (as ``chat.notifications``
    does from another web process) and return what each socket receives next."""
    layer = RedisChannelLayer(hosts=[redis_url])
    try:
        event = inbox_event(uuid.uuid4(), "message")
        await layer.group_send(AGENTS_CHANNEL_GROUP, event)
        return [await next_frame(socket) for socket in sockets] + [event]
    finally:
        await layer.close_pools()


def test_while_redis_is_down_agent_sockets_end_with_4503_and_work_again_when_it_is_back(tmp_path):
    log_path = tmp_path / "daphne.log"
    with dedicated_postgres(DATABASE) as postgres, dedicated_redis() as redis_server:
        environment = {"DATABASE_URL": postgres.database_url, "REDIS_URL": redis_server.url}
        subprocess.run([sys.executable, "manage.py", "shell", "-c", CREATE_AGENTS], cwd=ROOT, check=True,
                       capture_output=True, timeout=120,
                       env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
                            **environment})
        try:
            server_context = live_server(DATABASE, log_path=log_path, env=environment)
            server = server_context.__enter__()
        except LiveServerError as error:
            pytest.fail(str(error))
        try:
            alice, bob = (agent_session(server.url, name) for name in AGENTS)

            async def scenario() -> dict:
                # given both agents' dashboards connected while Redis is up, each hearing the agents' group
                sockets = [await open_agent_socket(server.url, alice), await open_agent_socket(server.url, bob)]
                *heard, sent = await agents_hear(redis_server.url, sockets)
                # when Redis goes away
                log_before_outage = len(log_path.read_text(errors="replace"))
                await asyncio.to_thread(redis_server.stop)
                # then each open socket is closed (its channel's receive failed)
                closed = [await until_closed(socket) for socket in sockets]
                # and a new handshake is refused (group_add failed), while the dashboard page still loads
                try:
                    refused = await open_agent_socket(server.url, alice)
                    handshake = {"accepted": await until_closed(refused)}
                except InvalidStatus as error:
                    handshake = {"status": error.response.status_code}
                page_while_down = await asyncio.to_thread(alice.get, f"{server.url}/dashboard/", timeout=30)
                outage_log = log_path.read_text(errors="replace")[log_before_outage:]
                # when Redis is back (empty: no groups), without restarting the web process
                await asyncio.to_thread(redis_server.start)
                log_before_recovery = len(log_path.read_text(errors="replace"))
                socket = await open_agent_socket(server.url, alice)
                *heard_when_back, sent_when_back = await agents_hear(redis_server.url, [socket])
                await socket.close()
                recovery_log = log_path.read_text(errors="replace")[log_before_recovery:]
                return {"heard": heard, "sent": sent, "closed": closed, "handshake": handshake,
                        "page while down": page_while_down.status_code, "outage log": outage_log,
                        "heard when back": heard_when_back, "sent when back": sent_when_back,
                        "recovery log": recovery_log}

            result = asyncio.run(scenario())
            assert result["heard"] == [result["sent"], result["sent"]]
            # closed with 4503, nothing sent before (never 1011)
            assert result["closed"] == [{"frames": [], "close code": CLOSE_UNAVAILABLE}] * 2
            # refused before acceptance: daphne answers a close before accept with 403 (never a 500)
            assert result["handshake"] == {"status": 403}
            assert result["page while down"] == 200
            # one WARNING line per socket (the two open ones, the refused handshake), no traceback
            outage_log = result["outage log"]
            assert "Traceback" not in outage_log
            assert [(level, logger, message.rsplit(" (", 1)[0]) for level, logger, message in log_records(outage_log)] \
                == [("WARNING", "chat.redis_outage", "websocket /ws/agent/ ended: its Redis is unavailable")] * 3, \
                outage_log
            # a new socket joins the agents' group again and hears it, and nothing is logged
            assert result["heard when back"] == [result["sent when back"]]
            assert "Traceback" not in result["recovery log"]
            assert [r for r in log_records(result["recovery log"]) if r[0] in ("WARNING", "ERROR", "CRITICAL")] == [], \
                result["recovery log"]
            # the same web process served it all
            os.kill(server.pid, 0)
        finally:
            server_context.__exit__(None, None, None)
