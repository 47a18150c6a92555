"""``REDIS_CONNECT_TIMEOUT_S`` / ``CHANNEL_LAYER_SOCKET_TIMEOUT_S`` reach the Channels layer, so a Redis host
that accepts a connection and never answers (a black-holed or hung server) makes the layer fail fast
(``chat.redis_outage`` then closes the socket with 4503) instead of hanging a websocket handshake.

Settings are read when the process starts, so the case runs in a subprocess with the variables set:
it builds the layer from ``settings.CHANNEL_LAYERS`` as Channels does and calls ``group_add`` (what a
consumer's handshake does) against a TCP listener that accepts and never answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

PROBE = """
import asyncio, json, os, time
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
import django
django.setup()
from django.conf import settings
from channels.layers import get_channel_layer

async def handshake():
    layer = get_channel_layer()
    started = time.monotonic()
    try:
        await layer.group_add("conversation.x", "specific.abc!def")
        outcome = "answered"
    except Exception as error:
        outcome = type(error).__module__ + "." + type(error).__name__
    return outcome, time.monotonic() - started

outcome, elapsed_s = asyncio.run(handshake())
print(json.dumps({"hosts": settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"], "outcome": outcome,
                  "elapsed_s": elapsed_s}))
"""


def test_a_redis_that_accepts_and_never_answers_fails_the_layer_within_the_socket_timeout():
    # given a "Redis" that accepts connections and never answers
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        environment = {**os.environ, "EMBEDDED_SERVICES": "1", "REDIS_URL": url, "REDIS_CONNECT_TIMEOUT_S": "0.5",
                       "CHANNEL_LAYER_SOCKET_TIMEOUT_S": "1.5"}
        # when the Channels layer of a process with these settings adds a socket to a group
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    # then the settings are in the layer's host, and it fails with redis-py's timeout after about that long
    assert result["hosts"] == [{"address": url, "socket_connect_timeout": 0.5, "socket_timeout": 1.5}]
    assert result["outcome"] == "redis.exceptions.TimeoutError"
    assert 1.4 < result["elapsed_s"] < 5
