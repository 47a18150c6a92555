"""Redis down under a running web process: handshakes and HTTP requests get clean refusals (no 500, no
traceback, one WARNING line each), and everything works again once Redis is back, without a restart.

The web process is a real daphne (``tests.live_server``) on a PostgreSQL server and a Redis server of
this test's own (``tests.dedicated_servers``; the run's shared Redis is never stopped), with the
conversation and identity rate limits on (the test run lifts them otherwise), so the limiter's Redis
is in the path of every request below. The customer is ``WidgetClient`` (what ``widget.js`` does).
"""

from __future__ import annotations

import asyncio
import json
import os
import re

import pytest
import redis
import requests
from channels_redis.core import RedisChannelLayer
from websockets.exceptions import InvalidStatus

from chat.notifications import conversation_group
from tests.dedicated_servers import dedicated_postgres, dedicated_redis
from tests.faults.widget_client import WidgetClient
from tests.live_server import LiveServerError, live_server

DATABASE = "faults_redis_outage"
LIMITS = {"RATE_LIMIT_CONVERSATIONS_PER_IP": "1000/hour", "RATE_LIMIT_CONVERSATIONS_PER_ORIGIN": "1000/hour",
          "RATE_LIMIT_IDENTITY_PER_IP": "1000/hour"}
# What the customer's widget is told (chat.consumers, chat.views), spelled out: this is the protocol.
SOCKET_UNAVAILABLE = {"type": "chat.unavailable", "retry_after_s": 5,
                      "message": "The chat is briefly unavailable; reconnecting in a moment."}
CLOSE_UNAVAILABLE = 4503
HTTP_UNAVAILABLE = {"error": "This is briefly unavailable; please try again in a moment.", "retry_after_s": 5.0}
# "<time> WARNING <logger> <message>" (config.settings' text log format)
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) (?P<message>.*)$")


def verified_conversations(customer: WidgetClient) -> requests.Response:
    """``POST /api/conversations/verified/`` with no identity claim (the limiter is asked first)."""
    return requests.post(f"{customer.base_url}/api/conversations/verified/", headers={"Origin": customer.base_url},
                         json={}, timeout=30)


def log_records(text: str) -> list[tuple[str, str, str]]:
    """``(level, logger, message)`` of each formatted log line in ``text`` (other lines left out)."""
    return [(m["level"], m["logger"], m["message"]) for m in map(LOG_LINE.match, text.splitlines()) if m]


def test_while_redis_is_down_nothing_answers_500_and_all_recovers_when_it_is_back(tmp_path):
    log_path = tmp_path / "daphne.log"
    with dedicated_postgres(DATABASE) as postgres, dedicated_redis() as redis_server:
        try:
            server_context = live_server(DATABASE, log_path=log_path,
                                         env={"DATABASE_URL": postgres.database_url, "REDIS_URL": redis_server.url,
                                              **LIMITS})
            server = server_context.__enter__()
        except LiveServerError as error:
            pytest.fail(str(error))
        try:
            customer = WidgetClient(server.url)
            # given a conversation started while Redis was up
            assert customer.start().status_code == 201
            # when Redis goes away
            redis_server.stop()
            log_before_outage = len(log_path.read_text(errors="replace"))

            async def while_down() -> dict:
                # a handshake is accepted, told the chat is unavailable, and closed with 4503
                try:
                    await customer.connect()
                except InvalidStatus as error:  # refused with an HTTP status instead
                    return {"handshake status": error.response.status_code}
                subprotocol = customer.socket.subprotocol
                frame = await customer.next_frame()
                close_code = await customer.wait_closed()
                return {"subprotocol": subprotocol, "frame": frame, "close code": close_code}

            down = asyncio.run(while_down())
            # a new conversation is not refused (its rate limit fails open), the transcript loads,
            # and a signed-in customer's endpoint, whose limit fails closed, answers 503
            started_while_down = WidgetClient(server.url).start()
            transcript_while_down = customer.transcript()
            verified_while_down = verified_conversations(customer)
            outage_log = log_path.read_text(errors="replace")[log_before_outage:]

            assert down == {"subprotocol": "supportbot.chat", "frame": SOCKET_UNAVAILABLE,
                            "close code": CLOSE_UNAVAILABLE}
            assert started_while_down.status_code == 201
            assert transcript_while_down.status_code == 200
            assert transcript_while_down.json()["messages"] == []
            assert verified_while_down.status_code == 503
            assert verified_while_down.headers["Retry-After"] == "5"
            assert verified_while_down.json() == HTTP_UNAVAILABLE
            # one WARNING line for each, and no traceback
            assert "Traceback" not in outage_log
            records = log_records(outage_log)
            assert [(level, logger, message.rsplit(" (", 1)[0]) for level, logger, message in records] == [
                ("WARNING", "chat.redis_outage",
                 f"websocket /ws/chat/{customer.conversation_id}/ ended: its Redis is unavailable"),
                ("WARNING", "chat.rate_limits",
                 "rate limit conversations_per_ip, conversations_per_origin: check skipped, its Redis is unavailable"),
                ("WARNING", "chat.rate_limits",
                 "rate limit identity_per_ip: request refused (503), its Redis is unavailable"),
            ], outage_log

            # when Redis is back (empty: no groups, no counters), without restarting the web process
            redis_server.start()
            log_before_recovery = len(log_path.read_text(errors="replace"))

            async def when_back() -> dict:
                # the socket is kept: it answers a frame, and hears its conversation's group
                await customer.connect()
                await customer.socket.send(json.dumps({"type": "chat.nothing"}))
                answered = await customer.next_frame()
                layer = RedisChannelLayer(hosts=[redis_server.url])
                await layer.group_send(conversation_group(customer.conversation_id),
                                       {"type": "chat.agent_message", "text": "Back again.", "author": "Alice"})
                relayed = await customer.next_frame()
                await layer.flush()
                await customer.close()
                return {"answered": answered, "relayed": relayed}

            back = asyncio.run(when_back())
            verified_when_back = verified_conversations(customer)
            started_when_back = WidgetClient(server.url).start()
            counters = sorted(key.decode().split("/")[2] for key in
                              redis.Redis.from_url(redis_server.url).keys("LIMITS:*"))
            recovery_log = log_path.read_text(errors="replace")[log_before_recovery:]

            assert back["answered"]["type"] == "chat.error"
            assert back["answered"]["code"] == "unknown_type"
            assert (back["relayed"]["type"], back["relayed"]["text"]) == ("chat.agent_message", "Back again.")
            # the identity endpoint checks the claim again (none: 403), and both limits count again
            assert verified_when_back.status_code == 403
            assert started_when_back.status_code == 201
            assert counters == ["conversations_per_ip", "conversations_per_origin", "identity_per_ip"]
            assert "Traceback" not in recovery_log
            # nothing about Redis any more: the only warning is Django's usual one for the 403 above
            assert [r for r in log_records(recovery_log) if r[0] in ("WARNING", "ERROR", "CRITICAL")] == [
                ("WARNING", "django.request", "Forbidden: /api/conversations/verified/")], recovery_log
            # the same web process served it all
            os.kill(server.pid, 0)
            assert postgres.psql("SELECT count(*) FROM chat_conversation") == [(3,)]
        finally:
            server_context.__exit__(None, None, None)
