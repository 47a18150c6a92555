"""The model file missing or corrupt when the product starts: ``/readyz`` and the logs say which file
and why, and the processes stay up (no crash loop), in the production process model.

The model server is ``manage.py serve_model`` as ``Procfile.production`` starts it (preloading the
active version, here the default one from ``LLM_MODEL_PATH``) and the web process a real daphne
pointed at it with ``LLM_SERVER_URL``, both on a PostgreSQL server of this test's own
(``tests.dedicated_servers``) so the registry they write to is this test's alone.
"""

from __future__ import annotations

import os

import pytest
import requests

from tests.dedicated_servers import dedicated_postgres
from tests.live_server import LiveServerError, live_server
from tests.model_server import model_server

DATABASE = "faults_model_file"


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_a_missing_or_corrupt_model_file_is_reported_by_readyz_and_the_logs_and_nothing_crash_loops(tmp_path, fault):
    # given LLM_MODEL_PATH naming a file that does not exist, or an HTML error page saved as the GGUF
    model_path = tmp_path / "model.gguf"
    if fault == "corrupt":
        model_path.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    reason = {"missing": f"model file not found: {model_path}", "corrupt": f"not a GGUF file: {model_path}"}[fault]
    with dedicated_postgres(DATABASE) as postgres:
        environment = {"LLM_MODEL_PATH": str(model_path)}
        try:
            # when the model server and a web process start
            with model_server(postgres.database_url, log_path=tmp_path / "model.log", env=environment,
                              preload=True) as models, \
                    live_server(DATABASE, log_path=tmp_path / "daphne.log",
                                env={**environment, "DATABASE_URL": postgres.database_url,
                                     "LLM_SERVER_URL": models.url}) as web:
                health = models.health()
                ready = requests.get(web.url + "/readyz", timeout=60)
                ready_again = requests.get(web.url + "/readyz", timeout=60)
                alive = requests.get(web.url + "/healthz", timeout=30)
                # both processes are still the ones started (a crash would have ended them)
                os.kill(models.pid, 0)
                os.kill(web.pid, 0)
        except LiveServerError as error:
            pytest.fail(str(error))
        # then the model server stays up, serving nothing
        assert health == {"status": "ok", "loaded": []}
        # and the web process is alive but not ready, because of the model only, naming the file and why
        assert alive.status_code == 200
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["failing"] == ["model"]
        assert reason in body["checks"]["model"]["error"]
        assert ready_again.json() == body
        # and the model server's log says so at start-up, with level and logger
        log = (tmp_path / "model.log").read_text()
        assert [line for line in log.splitlines() if "could not preload" in line and reason in line
                and " ERROR chat.management.commands.serve_model " in line], log
