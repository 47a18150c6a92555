"""System checks: warn when stored chunks were embedded by another model than the configured one;
refuse a malformed ``WEBSITE_ALLOWED_NETWORKS``."""

from __future__ import annotations

from django.core.checks import Error, Warning, register
from django.db import DatabaseError


@register("knowledge")
def website_allowed_networks_valid(app_configs=None, **kwargs):
    """``knowledge.E002`` for an entry of ``WEBSITE_ALLOWED_NETWORKS`` that is not a CIDR network
    (website syncs would fail on it)."""
    import ipaddress

    from django.conf import settings

    errors = []
    for entry in settings.WEBSITE_ALLOWED_NETWORKS:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as error:
            errors.append(Error(f"WEBSITE_ALLOWED_NETWORKS: {error}",
                                hint="comma-separated networks such as 10.0.5.0/24", id="knowledge.E002"))
    return errors


@register("knowledge", deploy=False, databases=["default"])
def embedding_model_matches(app_configs=None, databases=None, **kwargs):
    """``knowledge.W001`` when chunks of another embedding model exist (run ``manage.py reembed``)."""
    if not databases:
        return []
    from knowledge.embedding import model_id
    from knowledge.models import Chunk

    try:
        stale = Chunk.objects.exclude(embedding_model=model_id()).values_list("embedding_model", flat=True).distinct()
        stale = list(stale[:5])
    except DatabaseError:  # not migrated yet
        return []
    if not stale:
        return []
    return [
        Warning(
            f"chunks embedded with {', '.join(stale)} but the configured model is {model_id()}; "
            "they are not found by vector search until re-embedded",
            hint="run: python manage.py reembed",
            id="knowledge.W001",
        )
    ]
