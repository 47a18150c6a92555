"""Several hosts, as real processes: a Celery worker (the tuner host) fine-tunes, publishes and promotes
an adapter; two web processes (two web hosts) then answer with it. They share only what README
"Running on several hosts" says they share: one PostgreSQL, one Redis and the artifact storage's root
(``ARTIFACT_STORAGE_DIR``, standing for a shared volume or a bucket). Each has its own ``TUNING_DIR``
and ``MODEL_CACHE_DIR``, and the worker's ``TUNING_DIR`` is deleted before the web processes answer,
so nothing can be read from it.

The model is the tuning loop's tiny llama GGUF (random weights, SmolLM2's tokenizer), its base a
plain local path every process has, as the packaged model is. The web processes run the model in
process (no ``LLM_SERVER_URL``), so each one copies the adapter into its own cache and loads it with
llama.cpp; the worker's evaluation does the same in its own cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from chat.models import Message, ModelVersion, WidgetSite
from tests.faults.widget_client import WidgetClient
from tests.live_server import live_server
from tests.tuning.test_tuning_loop import COLLECTION, loop_settings, seeded, tiny_model  # noqa: F401
from tuning.fine_tuning import fine_tune_run_start
from tuning.models import FineTuneRun
from tuning.tasks import fine_tune_run

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "How much is express shipping?"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def wait_for_run(run_id: int, timeout_s: float, log: Path) -> FineTuneRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = FineTuneRun.objects.get(pk=run_id)
        if run.status not in FineTuneRun.IN_PROGRESS:
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} still {run.status}; worker log:\n{log.read_text(errors='replace')[-4000:]}")


async def ask(base_url: str) -> list[dict]:
    client = WidgetClient(base_url)
    assert client.start().status_code == 201
    await client.connect()
    try:
        return await client.ask(QUESTION, timeout_s=180)
    finally:
        await client.socket.close()


def test_an_adapter_tuned_on_the_worker_host_is_served_by_two_web_hosts_through_the_artifact_storage(
        seeded, loop_settings, tmp_path):  # noqa: F811
    shared = tmp_path / "shared-artifacts"
    database = connection.settings_dict["NAME"]
    # What every host is configured with alike: the model, generation and gate settings, the shared storage.
    common = {
        "LLM_MODEL_PATH": str(loop_settings.LLM_MODEL_PATH), "LLM_MAX_TOKENS": "16", "LLM_SERVER_URL": "",
        "ARTIFACT_STORAGE_DIR": str(shared), "TUNING_THREADS": "1",
        "TUNING_GATE_MIN_F1_GAIN": "-1", "TUNING_GATE_CITATION_TOLERANCE": "1",
        "TUNING_GATE_CITATION_PRECISION_TOLERANCE": "1", "TUNING_GATE_ABSTENTION_TOLERANCE": "1",
        "TUNING_GATE_FALSE_ABSTENTION_TOLERANCE": "1",
        # the model writes the answer (no quoted source sentence, no curated answer)
        "ANSWER_QUOTE_MIN_RELEVANCE": "2", "CURATED_MATCH_MAX_DISTANCE": "-1",
    }

    def own(host: str) -> dict:
        return {"TUNING_DIR": str(tmp_path / host / "tuning"), "MODEL_CACHE_DIR": str(tmp_path / host / "cache")}

    # given a fine-tune queued (the test process stands for the web host where "fine-tune now" is pressed)
    run = fine_tune_run_start(enqueue=False)
    base = ModelVersion.objects.get(is_active=True)
    # when a Celery worker on the tuner host runs it
    queue = f"test-hosts-{os.getpid()}"
    log = tmp_path / "worker.log"
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
                   "DATABASE_NAME": database, **common, **own("worker")}
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool=solo", f"--queues={queue}",
             f"--hostname=tuner-{os.getpid()}@%h", "--without-mingle", "--without-gossip", "--loglevel=INFO"],
            cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        fine_tune_run.apply_async(args=[run.pk], queue=queue)
        run = wait_for_run(run.pk, 900, log)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert run.status == "promoted", f"{run.error}\n{log.read_text(errors='replace')[-4000:]}"

    # then the adapter was exported into the worker's scratch folder and published to the shared storage
    version = ModelVersion.objects.get(is_active=True)
    digest = run.adapter_sha256
    assert version == run.model_version != base
    assert Path(run.adapter_path) == tmp_path / "worker" / "tuning" / "runs" / str(run.pk) / "adapter.gguf"
    assert (version.adapter_path, version.adapter_sha256) == (f"artifacts:models/{digest}/adapter.gguf", digest)
    assert files_under(shared) == [f"models/{digest}/adapter.gguf"]
    # and the worker's evaluation loaded it from its own cache, copied from the storage
    assert files_under(tmp_path / "worker" / "cache") == [f"{digest}/adapter.gguf"]

    # given the worker's scratch folder is gone (no other host could read it anyway)
    shutil.rmtree(tmp_path / "worker" / "tuning")
    # when a customer asks on each of two web processes, each with its own cache
    with live_server(database, log_path=tmp_path / "web-a.log", env={**common, **own("web-a")}) as a, \
            live_server(database, log_path=tmp_path / "web-b.log", env={**common, **own("web-b")}) as b:
        for server in (a, b):
            WidgetSite.objects.create(origin=server.url, collection=COLLECTION)

        async def both():
            return await asyncio.gather(ask(a.url), ask(b.url))

        frames = asyncio.run(both())

    # then both answered with the promoted version, each from a copy in its own cache
    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:] for name in ("web-a", "web-b")}
    for answer, name in zip(frames, ("web-a", "web-b")):
        assert answer[-1]["type"] == "chat.done", (answer, logs[name])
        assert Message.objects.get(pk=answer[-1]["message_id"]).model_version == version
        cached = tmp_path / name / "cache" / digest / "adapter.gguf"
        assert files_under(tmp_path / name / "cache") == [f"{digest}/adapter.gguf"]
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest
