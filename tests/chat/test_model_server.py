"""The model server (``chat.model_server``, a real ``manage.py serve_model`` process on loopback with
the real GGUF model) and the model client (``chat.model_client``) that web processes use with it or
with any OpenAI-compatible server: streaming, bad input, busy, cancel, hot swap, changed files, and
the answer pipeline's events through it.

The server runs with 2 sequence slots and a queue of 1, so "busy" is reachable with 4 requests.
"""

from __future__ import annotations

import shutil
import threading
from types import SimpleNamespace

import httpx2
import pytest
from django.conf import settings as django_settings

from chat import model_client as model_client_module
from chat import services
from chat.engine import EngineBusy, EngineError
from chat.model_client import HttpModelClient, LocalModelClient
from chat.model_server import BadRequest, parse_request
from tests.chat.test_engine import wait_until
from tests.live_server import LiveServerError, free_port
from tests.model_server import model_server

LONG = [{"role": "user", "content": "Count from one to two hundred in words, one number per line."}]
SHORT = [{"role": "user", "content": "Name three colours."}]


# --- request checking (no server) -------------------------------------------------------------------


def test_a_valid_request_is_parsed_with_the_settings_defaults(settings):
    parsed = parse_request({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert parsed == {"model": "", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                      "options": {"max_tokens": settings.LLM_MAX_TOKENS, "temperature": settings.LLM_TEMPERATURE,
                                  "repeat_penalty": 1.0, "seed": 0}}


def test_vllm_and_openai_option_names_are_read():
    parsed = parse_request({"model": "v2", "messages": [{"role": "system", "content": "x"}],
                            "max_completion_tokens": 7, "repetition_penalty": 1.2})
    assert parsed["model"] == "v2"
    assert parsed["options"]["max_tokens"] == 7
    assert parsed["options"]["repeat_penalty"] == 1.2


@pytest.mark.parametrize("body, reason", [
    ([], "the body must be a JSON object"),
    ({"messages": []}, "messages must be a list of 1 to 64 messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "each message needs a role"),
    ({"messages": [{"role": "user", "content": 5}]}, "each message needs a role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature must be a number"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 3}, "model must be a string"),
])
def test_a_bad_request_is_refused_with_the_reason(body, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_request(body)


# --- the real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, django_db_blocker):
    from django.db import connection

    with django_db_blocker.unblock():
        database = connection.settings_dict["NAME"]
    log_path = tmp_path_factory.mktemp("model-server") / "model.log"
    try:
        with model_server(database, log_path=log_path,
                          env={"MODEL_SERVER_SLOTS": "2", "LLM_QUEUE_SIZE": "1", "LLM_SLOT_CONTEXT_TOKENS": "1024"}) as running:
            yield running
    except LiveServerError as error:
        pytest.fail(str(error))


@pytest.fixture
def client(server):
    http_client = HttpModelClient(server.url, timeout_s=60)
    yield http_client
    http_client.close()


@pytest.fixture
def active(transactional_db):
    """The active (default) model version, committed so the server process sees it."""
    return services.model_version_active()


def pending(server) -> int:
    return sum(model["pending"] for model in server.health()["loaded"])


def generating(server) -> int:
    return sum(model["pending"] - model["queued"] for model in server.health()["loaded"])


def fill(client, version, server) -> list:
    """Both slots generating long answers (each admitted before the next is sent), then the one queue
    place taken."""
    running = []
    for count in (1, 2):
        running.append(client.submit(LONG, version=version, max_tokens=400))
        wait_until(lambda: generating(server) == count, timeout_s=30)
    running.append(client.submit(LONG, version=version, max_tokens=400))
    wait_until(lambda: pending(server) == 3, timeout_s=30)
    return running


def test_a_completion_streams_pieces_with_stats(client, active, server):
    # when a chat completion is streamed through the model server
    generation = client.submit(SHORT, version=active, max_tokens=12, temperature=0.0, ignore_eos=True)
    pieces = list(generation)
    # then text arrives piece by piece (a piece may join tokens the server's reader had fallen behind
    # on), the tokens are counted by the server's usage, and the sequence is released
    assert "".join(pieces).strip()
    assert generation.stats.tokens == 12
    assert 1 <= len(pieces) <= 12
    assert generation.stats.finish_reason == "length"
    assert generation.stats.first_token_ms is not None
    wait_until(lambda: pending(server) == 0)


def test_bad_input_gets_400_with_the_reason_and_the_server_keeps_serving(server, client, active):
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        not_json = http.post("/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        bad = http.post("/chat/completions", json={"messages": "hello"})
        unknown = http.post("/chat/completions", json={"model": "no-such-version", "messages": SHORT})
    assert (not_json.status_code, not_json.json()["error"]["type"]) == (400, "invalid_request_error")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "messages must be a list of 1 to 64 messages"
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "model_not_found")
    # and a good request right after is answered
    assert "".join(client.submit(SHORT, version=active, max_tokens=4)).strip()


def test_an_unknown_version_is_a_clear_engine_error(client, active):
    with pytest.raises(EngineError, match="404.*no model version named 'ghost'"):
        client.submit(SHORT, version=SimpleNamespace(name="ghost", base_model_path="", adapter_path=""))


def test_a_client_that_stops_reading_frees_its_sequence_on_the_server(client, active, server):
    # given a long answer streaming
    generation = client.submit(LONG, version=active, max_tokens=400)
    stream = iter(generation)
    next(stream)
    assert pending(server) == 1
    # when the client cancels (the customer closed the chat)
    generation.cancel()
    rest = list(stream)
    # then the stream ends as cancelled and the server frees the sequence
    assert generation.stats.finish_reason == "cancelled"
    assert len(rest) <= 2
    wait_until(lambda: pending(server) == 0, timeout_s=20)


def test_a_full_server_answers_busy_with_a_retry_delay(client, active, server):
    # given both slots generating and the one queue place taken
    running = fill(client, active, server)
    try:
        # when one more arrives, then it is refused as busy with a retry delay of at least a second
        with pytest.raises(EngineBusy) as busy:
            client.submit(SHORT, version=active)
        assert busy.value.retry_after_s >= 1.0
        assert pending(server) == 3
    finally:
        for generation in running:
            generation.cancel()
            list(generation)
    wait_until(lambda: pending(server) == 0, timeout_s=20)


def test_the_pipeline_maps_busy_to_chat_busy_and_streams_answers_through_the_server(client, active, server):
    # given a full server
    running = fill(client, active, server)
    try:
        events = list(services.answer_compose("How do I renew my licence?", retrieval=False, version=active,
                                              engine=client))
        assert [e.type for e in events] == ["chat.busy"]
        assert events[0].data["retry_after_s"] >= 1.0
        assert events[0].data["message"] == services.BUSY_MESSAGE
    finally:
        for generation in running:
            generation.cancel()
            list(generation)
    wait_until(lambda: pending(server) == 0, timeout_s=20)
    # when the server has room again, the same question streams tokens then the composed answer
    events = list(services.answer_compose("Name three colours.", retrieval=False, version=active, engine=client))
    assert [e.type for e in events][-1] == "answer.composed"
    assert {e.type for e in events[:-1]} == {"chat.token"}
    answer = events[-1].data["answer"]
    assert answer.method == "generated" and answer.text
    assert answer.timings["tokens"] >= 1
    assert answer.version == active


def test_a_new_version_is_served_beside_the_answer_in_flight(client, active, server, tmp_path):
    # given an answer streaming on the active version, and a new version (another GGUF file)
    copy = tmp_path / "candidate.gguf"
    shutil.copy(active.base_model_path, copy)
    candidate = services.model_version_register(name="candidate-copy", base_model_path=str(copy))
    in_flight = client.submit(LONG, version=active, max_tokens=40)
    stream = iter(in_flight)
    first = next(stream)
    # when the new version is activated and asked
    services.model_version_activate(candidate)
    fresh = client.submit(SHORT, version=candidate, max_tokens=6)
    fresh_text = "".join(fresh)
    # then both answers finish: the one in flight on the old model, the new one on the new model
    assert (first + "".join(stream)).strip()
    assert in_flight.stats.finish_reason in ("stop", "length")
    assert fresh_text.strip()
    loaded = [model["model"] for model in server.health()["loaded"]]
    assert str(copy) in loaded and active.base_model_path in loaded


def test_a_file_changed_since_registration_is_refused(client, active, tmp_path):
    copy = tmp_path / "tampered.gguf"
    shutil.copy(active.base_model_path, copy)
    version = services.model_version_register(name="tampered", base_model_path=str(copy))
    with open(copy, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EngineError, match="409.*has SHA-256"):
        client.submit(SHORT, version=version)


def test_an_unreachable_server_is_an_engine_error_and_chat_error(active):
    dead = HttpModelClient(f"http://127.0.0.1:{free_port()}/v1", timeout_s=5)
    try:
        with pytest.raises(EngineError, match="unreachable"):
            dead.submit(SHORT, version=active)
        events = list(services.answer_compose("Name three colours.", retrieval=False, version=active, engine=dead))
        assert [(e.type, e.data) for e in events] == [("chat.error", {"message": "The assistant is unavailable right now."})]
    finally:
        dead.close()


def test_the_setting_points_the_process_client_at_an_openai_compatible_server(server, active, settings):
    # given LLM_SERVER_URL naming the server (here the bundled one on loopback)
    settings.LLM_SERVER_URL = server.url
    previous = model_client_module.set_model_client(None)
    try:
        client = model_client_module.model_client()
        # then the process's client speaks HTTP to it and lists the registry's versions
        assert isinstance(client, HttpModelClient)
        assert active.name in client.models()
        assert "".join(client.submit(SHORT, version=active, max_tokens=4)).strip()
        client.close()
        # and without the setting the model runs in this process
        settings.LLM_SERVER_URL = ""
        model_client_module.set_model_client(None)
        assert isinstance(model_client_module.model_client(), LocalModelClient)
    finally:
        model_client_module.set_model_client(previous)


def test_readiness_asks_the_model_server_for_the_active_version(server, active, settings):
    from chat.readiness import model_check, NotReady

    settings.LLM_SERVER_URL = server.url
    previous = model_client_module.set_model_client(None)
    try:
        # given a model server serving the registry: the active version is ready
        assert model_check() == {"version": active.name, "server": server.url,
                                 "served": model_client_module.model_client().models()[:10]}
        # and when the server is down, not ready, with the reason
        settings.LLM_SERVER_URL = f"http://127.0.0.1:{free_port()}/v1"
        model_client_module.set_model_client(None)
        with pytest.raises(NotReady, match="could not list the models of .*Connection refused"):
            model_check()
    finally:
        model_client_module.set_model_client(previous)


def test_activation_asks_the_model_server_and_refuses_a_version_it_cannot_serve(server, active, tmp_path):
    from chat.models import ModelVersion

    # given the process talking to the bundled model server, and a version whose adapter is not a GGUF
    broken = tmp_path / "adapter.gguf"
    broken.write_text("<html>502 Bad Gateway</html>")
    version = services.model_version_register(name="broken-adapter", base_model_path=active.base_model_path,
                                              adapter_path=str(broken))
    previous = model_client_module.set_model_client(HttpModelClient(server.url, timeout_s=30))
    try:
        # when it is activated, the server's reason refuses it, recorded, and the active version stays
        with pytest.raises(EngineError, match="cannot serve broken-adapter: not a GGUF file"):
            services.model_version_activate(version)
        assert ModelVersion.objects.get(is_active=True).pk == active.pk
        assert "not a GGUF file" in ModelVersion.objects.get(pk=version.pk).refused_reason
        # and a version the server lists is activated
        copy = tmp_path / "candidate.gguf"
        shutil.copy(active.base_model_path, copy)
        good = services.model_version_register(name="served-copy", base_model_path=str(copy))
        assert services.model_version_activate(good).is_active
    finally:
        model_client_module.set_model_client(previous).close()


def test_activation_with_a_remote_engine_names_what_it_serves(active, monkeypatch):
    from chat.models import ModelVersion

    # given a remote OpenAI-compatible engine (llama-server, vLLM) that serves only the base model
    remote = HttpModelClient(f"http://127.0.0.1:{free_port()}/v1", timeout_s=5)
    monkeypatch.setattr(remote, "model_listing", lambda: ([active.name], {}))
    candidate = services.model_version_register(name="tuned-v7", base_model_path=active.base_model_path)
    previous = model_client_module.set_model_client(remote)
    try:
        # then activating an adapter it has not loaded is refused with what it does serve
        with pytest.raises(EngineError, match=f"does not serve a model named tuned-v7 \\(it serves: {active.name}\\)"):
            services.model_version_activate(candidate)
        assert ModelVersion.objects.get(is_active=True).pk == active.pk
        # and a server that cannot be asked refuses too, leaving the active version serving
        monkeypatch.undo()
        with pytest.raises(EngineError, match="could not list the models"):
            services.model_version_activate(candidate)
        assert ModelVersion.objects.get(is_active=True).pk == active.pk
    finally:
        model_client_module.set_model_client(previous)
        remote.close()
