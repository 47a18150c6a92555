"""``Procfile.production``: the process model, and its web command started as written (uvicorn with
two worker processes) serving HTTP, static files and the chat websocket on the test database."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from chat.conversation_access import client_subprotocols
from tests.config.test_settings import database_url
from tests.live_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, str]:
    """``Procfile.production`` as ``{process name: command}``."""
    entries = {}
    for line in (ROOT / "Procfile.production").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


SERVER_URL = "env LLM_SERVER_URL=${LLM_SERVER_URL:-http://127.0.0.1:${MODEL_SERVER_PORT:-8001}/v1} "


def test_procfile_runs_a_model_server_web_workers_a_recycling_tuner_and_one_beat():
    # given the production Procfile; when it is read
    entries = procfile()
    # then it has the five process types, the web and the tuner ask the model server, the tuner
    # recycles its child after each task, one beat
    assert list(entries) == ["model", "web", "worker", "tuner", "beat"]
    assert entries["model"] == "python manage.py serve_model --port ${MODEL_SERVER_PORT:-8001}"
    assert entries["web"].startswith(SERVER_URL + "uvicorn config.asgi:application ")
    assert entries["tuner"].startswith(SERVER_URL + "celery ")
    assert "--workers ${WEB_CONCURRENCY:-4}" in entries["web"]
    assert "--max-tasks-per-child=1" in entries["tuner"] and "--queues=${TUNING_QUEUE:-tuning}" in entries["tuner"]
    assert entries["beat"] == "celery -A config beat --loglevel=INFO"
    assert sum("beat" in command for command in entries.values()) == 1


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer")
        time.sleep(0.3)


@pytest.mark.django_db(transaction=True)
def test_the_web_command_serves_http_static_files_and_websockets_with_several_workers(tmp_path):
    # given the web command of Procfile.production, run by a shell as a Procfile runner would, on a free
    # port with two workers, DEBUG off, on the test database and the test run's Redis
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "false", "EMBEDDED_SERVICES": "1",
           "DATABASE_URL": database_url(), "HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "web.log", "wb")
    server = subprocess.Popen(["bash", "-c", "exec " + procfile()["web"]], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/healthz", server)
        # then two worker processes serve it (besides multiprocessing's resource tracker)
        workers = [child for child in psutil.Process(server.pid).children()
                   if "resource_tracker" not in " ".join(child.cmdline())]
        assert len(workers) == 2
        # and the widget script is served by the app
        with urllib.request.urlopen(base + "/static/widget/widget.js", timeout=10) as response:
            assert response.status == 200
            assert response.read() == (ROOT / "static" / "widget" / "widget.js").read_bytes()
        # and a conversation started over HTTP is reachable over the chat websocket
        request = urllib.request.Request(base + "/api/conversations/", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            conversation = json.loads(response.read())
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}/ws/chat/{conversation['id']}/",
                     subprotocols=client_subprotocols(conversation["token"]), open_timeout=30) as socket:
            socket.send(json.dumps({"type": "chat.message", "text": "   "}))
            assert json.loads(socket.recv(timeout=30)) == {"type": "chat.error", "message": "the message is empty",
                                                          "code": "empty"}
        # and its access log lines carry time, level and logger name like every other log line
        log.flush()
        access = [line for line in (tmp_path / "web.log").read_text().splitlines() if "GET /healthz" in line]
        assert re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.access '
                            r'127\.0\.0\.1:\d+ - "GET /healthz HTTP/1\.1" 200', access[-1]), access
    except Exception:
        log.flush()
        print((tmp_path / "web.log").read_text(errors="replace"))
        raise
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
