"""Redis restarted during a chat: the widget reconnects and the conversation continues, no message lost
or doubled.

The web process is a real daphne (``tests.live_server``) whose Channels layer (and rate-limit counters)
are on a Redis server of this test's own, and whose database is a PostgreSQL server of its own
(``tests.dedicated_servers``; the run's shared Redis is never stopped). The customer is
``WidgetClient``, which reconnects as ``static/widget/widget.js`` does: reload the transcript over
HTTP, then reopen the socket, backing off while that fails. Redis is shut down without saving (its
groups and channels are gone, as on a restart without persistence) and started again on the same
socket. While it is down the server tells sockets ``chat.unavailable`` and closes them with 4503
(``tests/faults/test_redis_outage.py`` checks the rest of the outage: HTTP, logs).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from channels_redis.core import RedisChannelLayer
from websockets.exceptions import InvalidStatus

from chat.consumers import UNAVAILABLE_MESSAGE, conversation_group
from chat.redis_outage import CLOSE_UNAVAILABLE
from tests.dedicated_servers import dedicated_postgres, dedicated_redis
from tests.faults.widget_client import WidgetClient
from tests.live_server import LiveServerError, live_server

DATABASE = "faults_redis_restart"


def test_the_widget_reconnects_after_redis_restarts_and_the_conversation_continues(tmp_path):
    with dedicated_postgres(DATABASE) as postgres, dedicated_redis() as redis_server:
        try:
            server_context = live_server(DATABASE, log_path=tmp_path / "daphne.log",
                                         env={"DATABASE_URL": postgres.database_url, "REDIS_URL": redis_server.url})
            server = server_context.__enter__()
        except LiveServerError as error:
            pytest.fail(str(error))
        try:
            customer = WidgetClient(server.url)

            async def scenario() -> dict:
                # given a customer who asked a question and got its answer, the socket left open
                assert customer.start().status_code == 201
                await customer.connect()
                first = await customer.ask("How long does shipping take?")
                # when Redis goes away
                await asyncio.to_thread(redis_server.stop)
                # then the server tells the widget the chat is unavailable and closes the socket (its
                # channel-layer receive failed)
                unavailable = await customer.next_frame()
                close_code = await customer.wait_closed()
                # and while Redis is down a new socket is told the same and closed, but the transcript
                # still loads
                try:
                    await customer.connect()
                    refused = {"frame": await customer.next_frame(), "close code": await customer.wait_closed()}
                except InvalidStatus as error:
                    refused = {"status": error.response.status_code}
                transcript_while_down = await asyncio.to_thread(customer.transcript)
                # when Redis is back (empty: no groups, no channels)
                await asyncio.to_thread(redis_server.start)
                # the widget reconnects by itself
                failed_attempts = await customer.reconnect()
                # and an agent's message to the conversation's group reaches the new socket
                layer = RedisChannelLayer(hosts=[redis_server.url])
                await layer.group_send(conversation_group(customer.conversation_id),
                                       {"type": "chat.agent_message", "text": "Still here.", "author": "Alice"})
                relayed = await customer.next_frame()
                await layer.flush()
                # and the next question is answered on it
                second = await customer.ask("Do you ship to Canada?")
                await customer.close()
                return {"first": first, "unavailable": unavailable, "close code": close_code, "refused": refused,
                        "transcript while down": transcript_while_down, "failed attempts": failed_attempts,
                        "relayed": relayed, "second": second}

            result = asyncio.run(scenario())
            assert result["first"][-1]["type"] == "chat.done", result["first"]
            # the socket was closed as unavailable, with the retry delay, and so was a handshake during
            # the outage (never a 1011 close or a 500 handshake)
            unavailable = {"type": "chat.unavailable", "retry_after_s": 5, "message": UNAVAILABLE_MESSAGE}
            assert result["unavailable"] == unavailable
            assert result["close code"] == CLOSE_UNAVAILABLE
            assert result["refused"] == {"frame": unavailable, "close code": CLOSE_UNAVAILABLE}
            transcript = result["transcript while down"]
            assert transcript.status_code == 200
            assert [m["role"] for m in transcript.json()["messages"]] == ["user", "assistant"]
            # the first reconnect attempt after Redis came back succeeded
            assert result["failed attempts"] == []
            assert (result["relayed"]["type"], result["relayed"]["text"]) == ("chat.agent_message", "Still here.")
            assert [f["type"] for f in result["second"]].count("chat.done") == 1
            assert result["second"][-1]["type"] == "chat.done", result["second"]
            # the same web process served it all
            os.kill(server.pid, 0)
            # and every question and answer is stored exactly once, in order
            stored = postgres.psql("SELECT role, text FROM chat_message ORDER BY id")
            assert [(role, text if role == "user" else "answer") for role, text in stored] == [
                ("user", "How long does shipping take?"), ("assistant", "answer"),
                ("user", "Do you ship to Canada?"), ("assistant", "answer"),
            ]
            assert (stored[1][1], stored[3][1]) == (result["first"][-1]["text"], result["second"][-1]["text"])
        finally:
            server_context.__exit__(None, None, None)
