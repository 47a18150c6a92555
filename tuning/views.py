"""Dashboard pages for corrections (included under ``/dashboard/corrections/``): write a correction
on an answer (with chunk search), and the review queue. Agents only (``chat.access.agent_required``)."""

from __future__ import annotations

from django.contrib import messages as flash
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from chat import agent_selectors
from chat.access import agent_required
from chat.models import Conversation, Message
from knowledge.selectors import chunk_search
from tuning import selectors, services
from tuning.models import Correction

SEARCH_K = 8


@agent_required
def correction_create(request: HttpRequest, message_id: int) -> HttpResponse:
    """GET: the answer, its retrieved chunks, a chunk search (``?q=``) and the correction form.
    POST ``corrected_answer``, ``reason``, ``chunk`` (repeatable chunk ids): ``services.correction_create``."""
    message = Message.objects.filter(pk=message_id, role=Message.Role.ASSISTANT).first()
    if message is None:
        raise Http404("no such answer")
    if request.method == "POST":
        try:
            services.correction_create(
                message_id, author=request.user, corrected_answer=request.POST.get("corrected_answer", ""),
                reason=request.POST.get("reason", ""), supporting_chunk_ids=request.POST.getlist("chunk"),
            )
        except (services.CorrectionError, ValueError) as error:
            flash.error(request, str(error))
        else:
            flash.success(request, "Correction saved; a second agent will review it.")
            return redirect("dashboard:conversation", conversation_id=message.conversation_id)
    try:
        _, _, details = agent_selectors.conversation_detail(message.conversation_id)
    except Conversation.DoesNotExist:
        raise Http404("no such conversation") from None
    query = request.GET.get("q", "").strip()[:500]
    found = chunk_search(query, k=SEARCH_K, collection=message.conversation.collection) if query else []
    return render(request, "dashboard/correction_form.html", {
        "message": message, "detail": details[message.pk], "query": query, "found": found,
        "reasons": Correction.Reason.choices, "form": request.POST,
        "corrections": selectors.corrections_by_message([message.pk]).get(message.pk, []),
    })


@agent_required
def correction_list(request: HttpRequest) -> HttpResponse:
    """The review queue: corrections of ``?status=`` (default ``pending``)."""
    status = request.GET.get("status", Correction.Status.PENDING)
    if status not in Correction.Status.values and status != "all":
        status = Correction.Status.PENDING
    return render(request, "dashboard/correction_list.html", {
        "corrections": selectors.correction_list(status=None if status == "all" else status),
        "status": status, "statuses": [*Correction.Status.choices, ("all", "All")],
    })


@agent_required
@require_POST
def correction_review(request: HttpRequest, correction_id: int) -> HttpResponse:
    """POST ``decision`` (``approve`` | ``reject``) and ``note``: ``services.correction_review``."""
    decision = request.POST.get("decision")
    if decision not in ("approve", "reject"):
        flash.error(request, "choose approve or reject")
        return redirect("tuning:correction_list")
    try:
        services.correction_review(correction_id, reviewer=request.user, approve=decision == "approve",
                                   note=request.POST.get("note", ""))
    except Correction.DoesNotExist:
        raise Http404("no such correction") from None
    except services.CorrectionError as error:
        flash.error(request, str(error))
    else:
        flash.success(request, f"Correction {correction_id} {decision}d.")
    return redirect("tuning:correction_list")
