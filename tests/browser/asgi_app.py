"""The project's ASGI application for the browser tests' live server, run by daphne in a subprocess:

    LIVE_SERVER_DATABASE_NAME=test_x daphne -b 127.0.0.1 -p 8123 tests.browser.asgi_app:application

It is ``config.asgi.application`` itself, the production app with no static-files wrapper (static
files, the widget script included, are served by its whitenoise middleware from collectstatic's
compressed, hashed files, as in production, so a 404 on an asset shows in the browser tests), pointed
at the database ``LIVE_SERVER_DATABASE_NAME`` (the test database the tests write to).
``tests.live_server`` starts it with ``config.settings``, ``DEBUG`` off, ``EMBEDDED_SERVICES=1`` (the
test run's embedded servers, plain HTTP on loopback), and ``STATIC_ROOT`` / ``WHITENOISE_USE_FINDERS``
off for the static files it collected once for the test run.
A subprocess (not a fork of the test process) keeps torch's and llama.cpp's threads out of a fork.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

django.setup()
if os.environ.get("LIVE_SERVER_DATABASE_NAME"):
    settings.DATABASES["default"]["NAME"] = os.environ["LIVE_SERVER_DATABASE_NAME"]

from config.asgi import application  # noqa: E402,F401
