"""Training-data reads: corrections for the dashboard's review queue and for one answer."""

from __future__ import annotations

from django.db.models import QuerySet

from tuning.models import Correction


def correction_list(*, status: str | None = None, stale: bool | None = None) -> QuerySet[Correction]:
    """Corrections newest first, optionally of one ``status`` and/or staleness, with author,
    reviewer and the corrected message loaded."""
    corrections = Correction.objects.select_related("author", "reviewer", "message")
    if status:
        corrections = corrections.filter(status=status)
    if stale is not None:
        corrections = corrections.filter(stale=stale)
    return corrections


def corrections_by_message(message_ids) -> dict[int, list[Correction]]:
    """``{message_id: [corrections newest first]}`` for the given assistant message ids."""
    result: dict[int, list[Correction]] = {}
    for correction in correction_list().filter(message_id__in=list(message_ids)):
        result.setdefault(correction.message_id, []).append(correction)
    return result
