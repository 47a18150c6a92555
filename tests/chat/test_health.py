"""``/healthz`` and ``/readyz`` (``chat.health_views``, checks in ``chat.readiness``), through the real
URL configuration and middleware, with the test run's real PostgreSQL, Redis, GGUF model file and
embedding model."""

from __future__ import annotations

import logging

import pytest
from django.conf import settings
from django.test import override_settings

from chat import engine as engine_module
from chat import readiness
from chat.models import ModelVersion


def test_healthz_answers_without_touching_the_database(client):
    # given a running process (and no django_db mark: any database access would raise)
    # when /healthz is asked
    response = client.get("/healthz")
    # then it answers 200 with a fixed body, not cached
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_readyz_is_200_with_every_check_when_all_dependencies_are_up(client, embedding_model, fake_engine):
    # given no active model version (the default GGUF of LLM_MODEL_PATH applies), not loaded yet
    # when /readyz is asked
    response = client.get("/readyz")
    # then every check passes and says what it checked
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {
            "database": {"ok": True, "vendor": "postgresql"},
            "redis": {"ok": True},
            "model": {"ok": True, "version": None, "base_model_path": settings.LLM_MODEL_PATH,
                      "adapter_path": "", "loaded": False},
            "embedding": {"ok": True, "model": f"{settings.EMBEDDING_MODEL_NAME}@{settings.EMBEDDING_DIM}"},
        },
    }
    # and nothing was written (no default model version registered)
    assert ModelVersion.objects.count() == 0


@pytest.mark.django_db
def test_readyz_reports_the_active_version_and_whether_this_process_serves_it(client, embedding_model, fake_engine):
    # given an active version on the real GGUF, which this process's engine serves
    version = ModelVersion.objects.create(name="v7", base_model_path=settings.LLM_MODEL_PATH,
                                          base_model_sha256="0" * 64, is_active=True)
    fake_engine.engine.ensure(engine_module.ModelKey(settings.LLM_MODEL_PATH))
    # when /readyz is asked
    response = client.get("/readyz")
    # then the model check names that version and says it is loaded
    assert response.status_code == 200
    assert response.json()["checks"]["model"] == {"ok": True, "version": version.name,
                                                  "base_model_path": settings.LLM_MODEL_PATH,
                                                  "adapter_path": "", "loaded": True}


@pytest.mark.django_db
def test_readyz_is_503_naming_the_model_when_the_active_version_file_is_missing(client, embedding_model, tmp_path):
    # given an active version whose GGUF file does not exist
    missing = tmp_path / "gone.gguf"
    ModelVersion.objects.create(name="v2", base_model_path=str(missing), base_model_sha256="0" * 64, is_active=True)
    # when /readyz is asked
    response = client.get("/readyz")
    # then it is 503 with only the model failing, and why
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failing"] == ["model"]
    assert body["checks"]["model"] == {"ok": False, "error": f"model file not found: {missing}"}
    assert [name for name, check in body["checks"].items() if check["ok"]] == ["database", "redis", "embedding"]
    # and the registry is unchanged
    assert list(ModelVersion.objects.values_list("name", "is_active")) == [("v2", True)]


@pytest.mark.django_db
def test_readyz_is_503_when_the_model_file_is_not_a_gguf(client, embedding_model, tmp_path):
    # given LLM_MODEL_PATH pointing at a file that is not a GGUF (e.g. an HTML error page saved as one)
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"<html>404 Not Found</html>")
    with override_settings(LLM_MODEL_PATH=str(corrupt)):
        # when /readyz is asked
        response = client.get("/readyz")
    # then the model check fails with the reason
    assert response.status_code == 503
    assert response.json()["failing"] == ["model"]
    assert response.json()["checks"]["model"] == {"ok": False, "error": f"not a GGUF file: {corrupt}"}


@pytest.mark.django_db
def test_readyz_is_503_naming_redis_when_it_does_not_answer(client, embedding_model, tmp_path):
    # given a REDIS_URL where no server listens
    with override_settings(REDIS_URL=f"unix://{tmp_path / 'no-redis.sock'}"):
        # when /readyz is asked
        response = client.get("/readyz")
    # then it is 503 with only redis failing
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["redis"]
    assert body["checks"]["redis"]["ok"] is False
    assert "no-redis.sock" in body["checks"]["redis"]["error"]


@pytest.mark.django_db
def test_readyz_logs_changes_of_state_once_not_every_probe(client, embedding_model, fake_engine, tmp_path, caplog,
                                                            monkeypatch):
    # given a process that has not been probed yet
    monkeypatch.setattr(readiness, "_last_failing", None, raising=False)
    caplog.set_level(logging.INFO)
    # when its Redis goes away and a load balancer probes three times
    with override_settings(REDIS_URL=f"unix://{tmp_path / 'no-redis.sock'}"):
        down = [client.get("/readyz").status_code for _ in range(3)]
    down_records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    caplog.clear()
    # and it is back for two more probes
    up = [client.get("/readyz").status_code for _ in range(2)]
    up_records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]

    # then each probe answered as before, but one WARNING line says it became unready, and why,
    # with no ERROR line from Django for the 503s
    assert down == [503, 503, 503] and up == [200, 200]
    assert [(name, level) for name, level, _ in down_records] == [("chat.readiness", "WARNING")], down_records
    assert down_records[0][2].startswith("not ready: redis: ") and "no-redis.sock" in down_records[0][2]
    # and one INFO line says it is ready again
    assert up_records == [("chat.readiness", "INFO", "ready again (database, redis, model, embedding pass)")]
