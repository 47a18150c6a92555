"""Dashboard pages for corrections (included under ``/dashboard/corrections/``): write a correction
on an answer (with chunk search), the review queue, and the curated answers approved corrections
became (see and edit them, or withdraw the correction). Agents only (``chat.access.agent_required``).

The curated answers are stored in the knowledge base (``knowledge.models.CuratedAnswer``) but written
only by this app (``tuning.services.correction_curate``), so their page is here: it reads them through
``knowledge.selectors`` and edits them through ``knowledge.services`` (the knowledge app has no
dashboard and may not import the agents' access rules from ``chat``)."""

from __future__ import annotations

from django.contrib import messages as flash
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from chat import agent_selectors
from chat.access import agent_required
from chat.models import Conversation, Message
from knowledge import services as knowledge_services
from knowledge.models import CuratedAnswer
from knowledge.selectors import chunk_search, curated_answer_list as curated_answers
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


@agent_required
@require_POST
def correction_withdraw(request: HttpRequest, correction_id: int) -> HttpResponse:
    """POST ``note``: reject an approved correction (``services.correction_revoke``); its curated
    answer leaves the knowledge base."""
    try:
        services.correction_revoke(correction_id, reviewer=request.user, note=request.POST.get("note", ""))
    except Correction.DoesNotExist:
        raise Http404("no such correction") from None
    except services.CorrectionError as error:
        flash.error(request, str(error))
    else:
        flash.success(request, f"Correction {correction_id} withdrawn; its curated answer is no longer served.")
    return redirect(request.POST.get("next") == "curated" and "tuning:curated_answer_list" or "tuning:correction_list")


@agent_required
def curated_answer_list(request: HttpRequest) -> HttpResponse:
    """The curated answers, most recently changed first, each with its evidence, the correction it
    came from and an edit form."""
    entries = list(curated_answers())
    corrections = {c.curated_answer_id: c for c in Correction.objects.filter(curated_answer__in=entries)}
    return render(request, "dashboard/curated_answers.html", {
        "rows": [{"curated": entry, "correction": corrections.get(entry.pk)} for entry in entries],
    })


@agent_required
@require_POST
def curated_answer_edit(request: HttpRequest, curated_id: int) -> HttpResponse:
    """POST ``question`` and ``answer``: ``knowledge.services.curated_answer_update`` (re-embeds it)."""
    try:
        knowledge_services.curated_answer_update(
            curated_id, question=request.POST.get("question", ""), answer=request.POST.get("answer", ""),
            user=request.user,
        )
    except CuratedAnswer.DoesNotExist:
        raise Http404("no such curated answer") from None
    except knowledge_services.CuratedAnswerError as error:
        flash.error(request, str(error))
    else:
        flash.success(request, f"Curated answer {curated_id} saved.")
    return redirect("tuning:curated_answer_list")
