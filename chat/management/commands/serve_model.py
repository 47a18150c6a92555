"""``manage.py serve_model [--host H] [--port P] [--no-preload]``: the model server (``chat.model_server``),
an OpenAI-compatible chat-completions API over HTTP (uvicorn, one process: it owns the models).

It loads the active model version first (``--no-preload`` waits for the first request), so the first
customer does not wait for a load. Threads come from ``LLM_THREADS`` (README "Model server": give it
the host's cores that the web processes and workers do not use). Point web processes and workers at
it with ``LLM_SERVER_URL=http://HOST:PORT/v1``.
"""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Serve the model versions over an OpenAI-compatible chat-completions API (continuous batching)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback)")
        parser.add_argument("--port", type=int, default=8001)
        parser.add_argument("--no-preload", action="store_true", help="load the active version on the first request")

    def handle(self, *args, host, port, no_preload, **options):
        import uvicorn
        from django.db import DatabaseError

        from chat.engine import EngineError
        from chat.model_server import ModelPool, UnknownModel, create_app, registry_key

        pool = ModelPool()
        if not no_preload:
            try:
                pool.engine_for(registry_key(""))
            except (UnknownModel, EngineError, RuntimeError, DatabaseError) as error:  # serve anyway; requests report it
                # logged (time, level, logger) for the log shipper; /readyz of the web processes says it too
                logger.error("could not preload the active model version: %s", error)
        self.stdout.write(f"model server on http://{host}:{port}/v1 (loaded: {', '.join(map(str, pool.loaded())) or 'none'})")
        uvicorn.run(create_app(pool), host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=30)
