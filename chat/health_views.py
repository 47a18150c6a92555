"""Health endpoints for load balancers and orchestrators (routed by ``config.urls``).

| path | answers |
|---|---|
| ``GET /healthz`` | the process is alive: always 200 ``{"status": "ok"}``; touches nothing else |
| ``GET /readyz`` | ready to serve (``chat.readiness``): 200 ``{"status": "ready", "checks": {...}}``, or 503 ``{"status": "unavailable", "failing": [names], "checks": {...}}`` |

Each check is ``{"ok": true, ...details}`` or ``{"ok": false, "error": str}``. Both are exempt from
the HTTPS redirect (``SECURE_REDIRECT_EXEMPT``); ``/readyz`` shows file paths and connection errors,
so keep it on the internal network (README "Production deployment").
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from chat.readiness import readiness_checks, readiness_state_log
from chat.service_unavailable import service_unavailable_response


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: 200 ``{"status": "ok"}`` while the process answers HTTP."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 when every check of ``chat.readiness`` passes, else 503 naming the failing ones.
    Only changes of state are logged (``chat.readiness.readiness_state_log``), not every probe."""
    results = readiness_checks()
    readiness_state_log(results)
    checks = {name: result.as_json() for name, result in results.items()}
    failing = [name for name, result in results.items() if not result.ok]
    if failing:
        return service_unavailable_response({"status": "unavailable", "failing": failing, "checks": checks})
    return JsonResponse({"status": "ready", "checks": checks})
