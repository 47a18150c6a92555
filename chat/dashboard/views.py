"""The agent review dashboard's pages (server-rendered; ``static/dashboard/dashboard.js`` re-fetches
the inbox and transcript fragments when the agent websocket reports a change).

Every view is ``agent_required`` (anonymous: login redirect; not an agent: 403) and thin: it reads
input, calls one selector or service, and renders or redirects.
"""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages as flash
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from chat import agent_selectors, agent_services, analytics
from chat.access import agent_required
from chat.models import Conversation


def _inbox_context(request: HttpRequest) -> dict:
    filters = [name for name in request.GET.getlist("filter") if name in agent_selectors.INBOX_FILTERS]
    query = request.GET.get("q", "")[:200]
    return {
        "conversations": agent_selectors.inbox_list(filters=filters, query=query),
        "filters": filters,
        "filter_choices": agent_selectors.INBOX_FILTERS.items(),
        "query": query,
    }


@agent_required
def inbox(request: HttpRequest) -> HttpResponse:
    """``/dashboard/``: the inbox, filtered by ``?filter=<name>`` (repeatable) and ``?q=<text>``."""
    return render(request, "dashboard/inbox.html", _inbox_context(request))


@agent_required
def inbox_fragment(request: HttpRequest) -> HttpResponse:
    """The inbox's list alone (same parameters), for live refresh."""
    return render(request, "dashboard/_inbox_list.html", _inbox_context(request))


def _detail_context(conversation_id: UUID) -> dict:
    try:
        conversation, transcript, details = agent_selectors.conversation_detail(conversation_id)
    except Conversation.DoesNotExist:
        raise Http404("no such conversation") from None
    # Not "messages": that name is the messages framework's (the flash notes in dashboard/base.html).
    return {"conversation": conversation, "transcript": transcript, "details": details}


@agent_required
def conversation(request: HttpRequest, conversation_id: UUID) -> HttpResponse:
    """``/dashboard/conversations/<id>/``: transcript, retrieval details, takeover and reply."""
    return render(request, "dashboard/conversation.html", _detail_context(conversation_id))


@agent_required
def transcript_fragment(request: HttpRequest, conversation_id: UUID) -> HttpResponse:
    """The conversation's status bar and transcript alone, for live refresh."""
    return render(request, "dashboard/_transcript.html", _detail_context(conversation_id))


def _conversation_action(service, success: str):
    @agent_required
    @require_POST
    def view(request: HttpRequest, conversation_id: UUID) -> HttpResponse:
        try:
            service(conversation_id, agent=request.user)
        except Conversation.DoesNotExist:
            raise Http404("no such conversation") from None
        except agent_services.TakeoverError as error:
            flash.error(request, str(error))
        else:
            flash.success(request, success)
        return redirect("dashboard:conversation", conversation_id=conversation_id)

    view.__doc__ = f"POST: {service.__name__} as the logged-in agent, then back to the conversation."
    return view


take = _conversation_action(agent_services.conversation_take, "You have taken this conversation.")
hand_back = _conversation_action(agent_services.conversation_hand_back, "The assistant is answering again.")
resolve = _conversation_action(agent_services.conversation_resolve, "Conversation resolved.")
mark_reviewed = _conversation_action(agent_services.conversation_mark_reviewed, "Marked as reviewed.")


@agent_required
@require_POST
def send_message(request: HttpRequest, conversation_id: UUID) -> HttpResponse:
    """POST ``text``: send the agent's message to the customer (``agent_services.agent_message_send``)."""
    try:
        agent_services.agent_message_send(conversation_id, agent=request.user, text=request.POST.get("text", ""))
    except Conversation.DoesNotExist:
        raise Http404("no such conversation") from None
    except (agent_services.TakeoverError, ValueError) as error:
        flash.error(request, str(error))
    return redirect("dashboard:conversation", conversation_id=conversation_id)


@agent_required
def analytics_page(request: HttpRequest) -> HttpResponse:
    """``/dashboard/analytics/``: volumes, outcomes, feedback, TTFT percentiles, the groundedness
    check's method mix and removed sentences, and content gaps."""
    per_day = analytics.conversations_per_day(days=30)
    outcomes = analytics.answer_outcomes()
    return render(request, "dashboard/analytics.html", {
        "per_day_chart": analytics.bar_chart([(day.strftime("%m-%d"), n) for day, n in per_day]),
        "per_day": per_day,
        "outcomes": outcomes,
        "outcome_chart": analytics.hbar_chart([
            ("Answered", outcomes["answered"]), ("Abstained", outcomes["abstained"]),
            ("Handed off", outcomes["handed_off"]), ("Resolved without agent", outcomes["resolved_without_agent"]),
        ]),
        "feedback": analytics.feedback_summary(),
        "grounding": analytics.grounding_summary(),
        "ttft": analytics.ttft_percentiles(),
        "gaps": analytics.content_gaps(),
    })
