"""Settings for the test run (pytest-django's ``DJANGO_SETTINGS_MODULE``): the production settings of
``config.settings`` in explicit development mode (``EMBEDDED_SERVICES=1``: the embedded PostgreSQL and
Redis unless ``DATABASE_URL`` / ``REDIS_URL`` are set, development ``SECRET_KEY`` and
``ALLOWED_HOSTS``), with ``DEBUG`` off as in production.

The variable is set in the process environment, so subprocesses the tests start (the live daphne
servers, ``manage.py`` commands) read the same development mode; a test that needs production mode
(``tests/test_deploy.py``) removes it from its subprocess's environment.
"""

import os

os.environ.setdefault("EMBEDDED_SERVICES", "1")
# Every test (and live server) talks from 127.0.0.1 and starts many conversations a minute: the rate
# limits are lifted here, and tests/chat/test_rate_limits.py sets the ones it checks.
for _name in ("RATE_LIMIT_CONVERSATIONS_PER_IP", "RATE_LIMIT_CONVERSATIONS_PER_ORIGIN",
              "RATE_LIMIT_QUESTIONS_PER_CONVERSATION", "RATE_LIMIT_IDENTITY_PER_IP"):
    os.environ.setdefault(_name, "")

from config.settings import *  # noqa: E402,F401,F403
