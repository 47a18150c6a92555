"""Postgres restarted under a running web process: requests recover without restarting it.

The web process is a real daphne (``tests.live_server``) on a PostgreSQL server of this test's own
(``tests.dedicated_servers``: stopping the run's shared embedded server would break every other test
and live server), with the run's Redis. A customer has a conversation open over the websocket;
PostgreSQL is stopped (``pg_ctl stop -m fast`` cuts every connection) and started again; the same
web process then serves the readiness probe, the transcript, new conversations and the next answer.
Persistent connections (``conn_max_age`` in ``DATABASE_URL``), a deployer's usual choice, are tested
beside the default of one connection per request: Django reuses such a connection without noticing
that the server behind it restarted unless ``CONN_HEALTH_CHECKS`` is on.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import requests

from tests.dedicated_servers import dedicated_postgres
from tests.faults.widget_client import WidgetClient
from tests.live_server import LiveServerError, live_server

DATABASE = "faults_postgres_restart"


def rows(postgres, conversation_id: str) -> list[tuple[str, str]]:
    """(role, text) of the conversation's messages, oldest first, read straight from the server."""
    return [(role, text) for role, text in postgres.psql(
        f"SELECT role, text FROM chat_message WHERE conversation_id = '{conversation_id}' ORDER BY id")]


@pytest.mark.parametrize("conn_max_age", [0, 600], ids=["connection-per-request", "persistent-connections"])
def test_web_requests_recover_after_postgres_restarts_without_restarting_the_web_process(tmp_path, conn_max_age):
    with dedicated_postgres(DATABASE) as postgres:
        url = f"{postgres.database_url}&conn_max_age={conn_max_age}"
        try:
            server_context = live_server(DATABASE, log_path=tmp_path / "daphne.log", env={"DATABASE_URL": url})
            server = server_context.__enter__()
        except LiveServerError as error:
            pytest.fail(str(error))
        try:
            customer, another = WidgetClient(server.url), WidgetClient(server.url)

            def get(path: str) -> requests.Response:
                return requests.get(server.url + path, timeout=60)

            async def scenario() -> dict:
                # given a customer who asked a question and got its answer over the websocket
                assert customer.start().status_code == 201
                await customer.connect()
                before = await customer.ask("How long does shipping take?")
                # and a first request on every path that keeps a connection (HTTP views and the socket's)
                assert (await asyncio.to_thread(get, "/readyz")).status_code == 200
                # when PostgreSQL stops
                await asyncio.to_thread(postgres.stop)
                down = {"healthz": await asyncio.to_thread(get, "/healthz"), "readyz": await asyncio.to_thread(get, "/readyz")}
                # and is started again, the web process untouched
                await asyncio.to_thread(postgres.start)
                up = {"readyz": await asyncio.to_thread(get, "/readyz"),
                      "transcript": await asyncio.to_thread(customer.transcript),
                      "created": await asyncio.to_thread(another.start)}
                after = await customer.ask("Do you ship to Canada?")
                await customer.close()
                # and a new customer opens a socket (its handshake reads the conversation) and asks
                await another.connect()
                new_customer = await another.ask("What is your returns policy?")
                await another.close()
                return {"before": before, "down": down, "up": up, "after": after, "new customer": new_customer}

            result = asyncio.run(scenario())
            before, down, up, after = result["before"], result["down"], result["up"], result["after"]
            assert before[-1]["type"] == "chat.done", before
            # then, while it is down, the web process stays up and says why it is not ready
            assert down["healthz"].status_code == 200
            assert down["readyz"].status_code == 503
            # (the generator's and the embedder's active versions are both read from the database)
            assert down["readyz"].json()["failing"] == ["database", "model", "embedding"]
            # and once it is back the very first requests already succeed: readiness, the transcript,
            # a new conversation, and the next answer on the socket that stayed open
            assert up["readyz"].status_code == 200, up["readyz"].text
            assert up["readyz"].json()["status"] == "ready"
            assert up["transcript"].status_code == 200, up["transcript"].text
            assert [m["role"] for m in up["transcript"].json()["messages"]] == ["user", "assistant"]
            assert up["created"].status_code == 201, up["created"].text
            assert after[-1]["type"] == "chat.done", after
            assert result["new customer"][-1]["type"] == "chat.done", result["new customer"]
            # and it is the same process
            os.kill(server.pid, 0)
            # and every question and answer is stored once, in order
            stored = rows(postgres, customer.conversation_id)
            assert [(role, text if role == "user" else "answer") for role, text in stored] == [
                ("user", "How long does shipping take?"), ("assistant", "answer"),
                ("user", "Do you ship to Canada?"), ("assistant", "answer"),
            ]
            assert (stored[1][1], stored[3][1]) == (before[-1]["text"], after[-1]["text"])
            assert rows(postgres, another.conversation_id)[0] == ("user", "What is your returns policy?")
            assert postgres.psql("SELECT count(*) FROM chat_message") == [(6,)]
        finally:
            server_context.__exit__(None, None, None)
