"""The project's ASGI application for the browser tests' live server, run by daphne in a subprocess:

    LIVE_SERVER_DATABASE_NAME=test_x daphne -b 127.0.0.1 -p 8123 tests.browser.asgi_app:application

It is ``config.asgi.application`` pointed at the database ``LIVE_SERVER_DATABASE_NAME`` (the test
database the tests write to) and wrapped in Django's static-files handler, as Channels'
``ChannelsLiveServerTestCase`` does, so ``/static/widget/widget.js`` is served without ``collectstatic``.
A subprocess (not a fork of the test process) keeps torch's and llama.cpp's threads out of a fork.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

django.setup()
if os.environ.get("LIVE_SERVER_DATABASE_NAME"):
    settings.DATABASES["default"]["NAME"] = os.environ["LIVE_SERVER_DATABASE_NAME"]

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from config.asgi import application as project_application  # noqa: E402

application = ASGIStaticFilesHandler(project_application)
