"""Celery routing: fine-tunes (LoRA and embedder, each with its evaluation) go to their own queue, read from settings at send time."""

from __future__ import annotations


def test_fine_tunes_are_routed_to_the_tuning_queue(settings):
    from config.celery import app

    settings.TUNING_QUEUE = "gpu-box"
    assert app.amqp.router.route({}, "tuning.fine_tune_run")["queue"].name == "gpu-box"
    assert app.amqp.router.route({}, "tuning.embedder_run")["queue"].name == "gpu-box"
    assert app.amqp.router.route({}, "knowledge.ingest_source")["queue"].name == app.conf.task_default_queue
    # an embedding-model switch an admin queued runs beside ingestion, not behind an hour-long fine-tune
    assert (app.amqp.router.route({}, "knowledge.activate_embedding_version")["queue"].name
            == app.conf.task_default_queue)
