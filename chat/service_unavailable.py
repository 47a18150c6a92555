"""503 answers whose cause is logged where it is found, not once per request by Django.

Django's request handler logs an ERROR line (``django.request``, "Service Unavailable: <path>") for
every 5xx response. For a 503 the product gives on purpose (a dependency is down and the caller
already logged one WARNING line, or readiness logs only its changes of state), that line would
repeat on every request or probe: load balancers probe ``/readyz`` every few seconds. Responses built
here carry Django's own flag against logging a response twice (``django.utils.log.log_response``
skips a response whose ``_has_been_logged`` is set), so each 503 path logs what it decides to, once.
"""

from __future__ import annotations

from django.http import JsonResponse


def service_unavailable_response(body: dict, *, retry_after_s: int | None = None) -> JsonResponse:
    """A 503 JSON response of ``body``, with ``Retry-After: retry_after_s`` (whole seconds) when
    given, that Django does not log (its cause is logged by the caller)."""
    response = JsonResponse(body, status=503)
    if retry_after_s is not None:
        response["Retry-After"] = str(retry_after_s)
    response._has_been_logged = True
    return response
