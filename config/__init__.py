"""Project configuration: settings, ASGI routing, Celery app and the embedded dev servers."""

from config.celery import app as celery_app

__all__ = ("celery_app",)
