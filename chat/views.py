"""HTTP endpoints of the chat widget, and the demo page.

The widget runs on the company's pages, so the API answers the origins of ``WIDGET_ALLOWED_ORIGINS``
(plus the site's own hosts) with CORS headers and refuses other origins. It uses no cookies: a
conversation is authorised by its secret token in the ``X-Conversation-Token`` header
(``chat.conversation_access``; a ``?token=`` in the URL is refused with 400), so the endpoints are
CSRF-exempt. Every error is a JSON ``{"error": str}``.

A signed-in customer of the host site is identified by ``user_id`` and ``user_hash`` in the JSON body
(``chat.identity``: the hash is HMAC-SHA256 of the id with the site's secret; a wrong or missing hash
is 403). The hash is a lasting credential of that customer, so it is refused in a query string (400).

| method and path | what |
|---|---|
| ``POST /api/conversations/`` | start a conversation: ``{"id", "token", "verified"}`` and ``widget_limits()`` (201); 429 with ``Retry-After`` past the rate limits |
| ``POST /api/conversations/verified/`` | a verified customer's conversations on this site: ``{"conversations": [...]}``; 429 with ``Retry-After`` past the rate limit; 503 with ``Retry-After`` while Redis is unavailable |
| ``POST /api/conversations/<id>/resume/`` | a verified customer resumes one of them on this device: ``{"id", "token", "status"}`` and ``widget_limits()``; 429 with ``Retry-After`` past the rate limit; 503 with ``Retry-After`` while Redis is unavailable |
| ``GET /api/conversations/<id>/messages/`` | its transcript (``chat.transcripts.transcript_get``) and ``widget_limits()`` |
| ``GET /api/conversations/<id>/passages/<chunk_id>/`` | a cited passage: ``{"status", "notice", "title", "url", "before", "passage", "after"}`` |
| ``POST /api/conversations/<id>/handoff/`` | ask for a human: ``{"id", "status"}`` |
"""

from __future__ import annotations

import json
import re
from functools import wraps
from uuid import UUID

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django.views.decorators.csrf import csrf_exempt
from django.views.defaults import page_not_found

from chat import rate_limits, services
from chat.conversation_access import TOKEN_HEADER, ConversationAccessError, request_conversation
from chat.identity import Identity, IdentityRefused, identity_check
from chat.models import Conversation
from chat.origins import CollectionRefused, conversation_collection, origin_allowed
from chat.selectors import verified_conversation_get, verified_conversation_list
from chat.service_unavailable import service_unavailable_response
from chat.transcripts import cited_passage_get, transcript_get

# Matched with fullmatch: "$" would also match before a trailing newline ("abc\n" was accepted).
_COLLECTION = re.compile(r"[\w.-]{1,100}")
_PREFLIGHT_MAX_AGE_S = 600


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


class BadRequest(Exception):
    """A widget API request's input is malformed: answer 400 with the message."""


HASH_IN_URL_MESSAGE = "user_hash is not accepted in URLs; send it in the JSON body"


def _json_body(request: HttpRequest) -> dict:
    """The request's JSON object body (``{}`` when there is none or it is not ``application/json``).
    Raises ``BadRequest`` for malformed JSON, a body that is not an object, or a ``user_hash`` in the
    query string (see the module docstring)."""
    if "user_hash" in request.GET:
        raise BadRequest(HASH_IN_URL_MESSAGE)
    if request.content_type != "application/json" or not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _origin(request: HttpRequest) -> str:
    return request.headers.get("Origin", "")[:300]


def widget_api(*methods: str):
    """Decorate a widget API view: CSRF-exempt; answers CORS preflight (``OPTIONS``) for allowed
    origins; refuses a request whose ``Origin`` is not allowed (403) or whose method is not one of
    ``methods`` (405); adds ``Access-Control-Allow-Origin`` for an allowed cross-origin caller."""

    def decorate(view):
        @csrf_exempt
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            origin = request.headers.get("Origin")
            if not origin_allowed(origin):
                response = _error("this site is not allowed to use the chat widget", 403)
            elif request.method == "OPTIONS":
                response = HttpResponse(status=204)
                response["Access-Control-Allow-Methods"] = ", ".join([*methods, "OPTIONS"])
                response["Access-Control-Allow-Headers"] = f"Content-Type, {TOKEN_HEADER}"
                response["Access-Control-Max-Age"] = str(_PREFLIGHT_MAX_AGE_S)
            elif request.method not in methods:
                response = _error(f"method {request.method} is not allowed", 405)
                response["Allow"] = ", ".join(methods)
            else:
                response = view(request, *args, **kwargs)
            if origin and origin_allowed(origin):
                response["Access-Control-Allow-Origin"] = origin
                if response.has_header("Retry-After"):
                    response["Access-Control-Expose-Headers"] = "Retry-After"
            patch_vary_headers(response, ["Origin"])
            return response

        return wrapped

    return decorate


def conversation_required(view):
    """Decorate a widget API view taking ``conversation_id``: it receives the ``Conversation`` instead,
    once ``chat.conversation_access.request_conversation`` accepted the request's token; otherwise
    the request gets that check's error (400 for a token in the URL, 403 otherwise)."""

    @wraps(view)
    def wrapped(request: HttpRequest, conversation_id: UUID, *args, **kwargs) -> HttpResponse:
        try:
            conversation = request_conversation(request, conversation_id)
        except ConversationAccessError as error:
            return _error(str(error), error.status)
        return view(request, conversation, *args, **kwargs)

    return wrapped


RATE_LIMITED_MESSAGE = "Too many new conversations from here; please try again in a moment."
IDENTITY_RATE_LIMITED_MESSAGE = "Too many requests from here; please try again in a moment."


def rate_limited_response(limited: rate_limits.RateLimited, message: str = RATE_LIMITED_MESSAGE) -> JsonResponse:
    """429 ``{"error": message, "retry_after_s"}`` with the ``Retry-After`` header (whole seconds)."""
    response = JsonResponse({"error": message, "retry_after_s": round(limited.retry_after_s, 1)}, status=429)
    response["Retry-After"] = limited.retry_after_header
    return response


UNAVAILABLE_MESSAGE = "This is briefly unavailable; please try again in a moment."


def unavailable_response(unavailable: rate_limits.RateLimiterUnavailable) -> JsonResponse:
    """503 ``{"error": UNAVAILABLE_MESSAGE, "retry_after_s"}`` with the ``Retry-After`` header (whole
    seconds), for a request whose rate limit fails closed while Redis is unavailable. Not logged by
    Django: ``chat.rate_limits`` logged the one WARNING line that says why."""
    return service_unavailable_response({"error": UNAVAILABLE_MESSAGE, "retry_after_s": unavailable.retry_after_s},
                                        retry_after_s=int(unavailable.retry_after_header))


def widget_limits() -> dict:
    """What the widget must know of the server's limits, sent with every response that gives it a
    conversation: ``{"message_max_chars": int, "feedback_comment_max_chars": int}``, characters after
    stripping: of a question (``settings.WIDGET_MESSAGE_MAX_CHARS``; the socket and the answer
    pipeline refuse longer ones) and of a feedback or rating comment
    (``settings.FEEDBACK_COMMENT_MAX_CHARS``; ``chat.feedback`` refuses longer ones). The widget has
    no copy of its own, so raising a setting raises it everywhere."""
    return {"message_max_chars": settings.WIDGET_MESSAGE_MAX_CHARS,
            "feedback_comment_max_chars": settings.FEEDBACK_COMMENT_MAX_CHARS}


@widget_api("POST")
def conversation_create(request: HttpRequest) -> JsonResponse:
    """Start a conversation. Body (optional, ``application/json``): ``{"collection": str}`` (letters,
    digits, ``_.-``), checked against the collection of the request's origin
    (``chat.origins.conversation_collection``: an admin's ``WidgetSite`` row, else ``"default"``),
    which is the one used; ``"user_id": str, "user_hash": str`` for a signed-in customer of the host
    site (``chat.identity.identity_check``), recorded on the conversation once verified.

    Returns 201 ``{"id": str, "token": str, "verified": bool}`` and the limits of ``widget_limits()``;
    400 on a malformed body or
    ``user_id``; 403 when the named collection is not the origin's, for a user id without a valid
    hash, or without one on a site that requires it; 429 (``rate_limited_response``) past the
    client IP's or the origin's limit (``chat.rate_limits.conversation_start_check``; while Redis is
    unavailable that limit is skipped, not a refusal). Nothing is created on an error."""
    try:
        body = _json_body(request)
    except BadRequest as error:
        return _error(str(error), 400)
    requested = body.get("collection")
    if requested is not None and (not isinstance(requested, str) or not _COLLECTION.fullmatch(requested)):
        return _error("collection must be 1 to 100 letters, digits, '_', '.' or '-'", 400)
    origin = _origin(request)
    try:
        collection = conversation_collection(origin=origin, requested=requested)
    except CollectionRefused as refused:
        return _error(str(refused), 403)
    try:
        identity = identity_check(origin=origin, user_id=body.get("user_id"), hash_value=body.get("user_hash"))
    except IdentityRefused as refused:
        return _error(str(refused), refused.status)
    try:
        rate_limits.conversation_start_check(client_ip=request.META.get("REMOTE_ADDR"), origin=origin)
    except rate_limits.RateLimited as limited:
        return rate_limited_response(limited)
    conversation = services.conversation_start(collection=collection, origin=origin,
                                               verified_user_id=identity.user_id or "")
    return JsonResponse({"id": str(conversation.pk), "token": conversation.token, "verified": identity.verified,
                         **widget_limits()}, status=201)


def verified_identity_required(view):
    """Decorate a widget API view for a signed-in customer: the JSON body must carry ``user_id`` and
    a valid ``user_hash`` for the request's origin (``chat.identity.identity_check``); the view
    receives the ``Identity`` after the request. Otherwise 400 (malformed body or ``user_id``, a hash in
    the URL) or 403 (no claim, a missing or wrong hash, a site without identity verification).

    Every request is first counted against the client IP's ``RATE_LIMIT_IDENTITY_PER_IP``
    (``chat.rate_limits.identity_request_check``), refused ones too, so hashes, user ids and
    conversation ids cannot be tried faster than that; past it 429 (``rate_limited_response``) and
    nothing is checked or read. That limit fails closed: while Redis is unavailable the answer is 503
    (``unavailable_response``) and nothing is checked or read either."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            rate_limits.identity_request_check(client_ip=request.META.get("REMOTE_ADDR"))
        except rate_limits.RateLimited as limited:
            return rate_limited_response(limited, IDENTITY_RATE_LIMITED_MESSAGE)
        except rate_limits.RateLimiterUnavailable as unavailable:
            return unavailable_response(unavailable)
        try:
            body = _json_body(request)
            identity = identity_check(origin=_origin(request), user_id=body.get("user_id"),
                                      hash_value=body.get("user_hash"), anonymous_allowed=False)
        except BadRequest as error:
            return _error(str(error), 400)
        except IdentityRefused as refused:
            return _error(str(refused), refused.status)
        return view(request, identity, *args, **kwargs)

    return wrapped


@widget_api("POST")
@verified_identity_required
def verified_conversations(request: HttpRequest, identity: Identity) -> JsonResponse:
    """The verified customer's conversations started on this site from any device
    (``chat.selectors.verified_conversation_list``): ``{"conversations": [{"id", "status",
    "created_at", "updated_at", "messages", "preview"}]}``, most recent first, without tokens."""
    return JsonResponse({"conversations": verified_conversation_list(origin=identity.origin, user_id=identity.user_id)})


@widget_api("POST")
@verified_identity_required
def conversation_resume(request: HttpRequest, identity: Identity, conversation_id: UUID) -> JsonResponse:
    """Resume one of the verified customer's conversations on this device: ``{"id", "token",
    "status"}`` and ``widget_limits()`` (the token opens its websocket and API as usual). 403, one answer for an unknown id
    and another customer's or site's conversation."""
    try:
        conversation = verified_conversation_get(conversation_id, origin=identity.origin, user_id=identity.user_id)
    except Conversation.DoesNotExist:
        return _error("unknown conversation, or not this customer's", 403)
    return JsonResponse({"id": str(conversation.pk), "token": conversation.token, "status": conversation.status,
                         **widget_limits()})


@widget_api("GET")
@conversation_required
def conversation_messages(request: HttpRequest, conversation: Conversation) -> JsonResponse:
    """The transcript (``chat.transcripts.transcript_get``) and ``widget_limits()``; 403 without the
    conversation's token."""
    return JsonResponse({**transcript_get(conversation), **widget_limits()})


@widget_api("GET")
@conversation_required
def cited_passage(request: HttpRequest, conversation: Conversation, chunk_id: int) -> JsonResponse:
    """A passage cited in the conversation (``chat.transcripts.cited_passage_get``: the passage now, or
    a "changed" / "removed" view once its source was re-ingested or deleted); 403 without the token,
    404 only when the conversation never cited that chunk."""
    passage = cited_passage_get(conversation, chunk_id)
    if passage is None:
        return _error("this passage was not cited in the conversation", 404)
    return JsonResponse(passage)


@widget_api("POST")
@conversation_required
def conversation_handoff(request: HttpRequest, conversation: Conversation) -> JsonResponse:
    """Ask for a human agent (``chat.services.conversation_request_human``). Returns
    ``{"id": str, "status": str}``; 403 without the token."""
    conversation = services.conversation_request_human(conversation)
    return JsonResponse({"id": str(conversation.pk), "status": conversation.status})


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """404 handler: JSON under ``/api/`` (the widget parses every API answer), Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return _error("not found", 404)
    return page_not_found(request, exception)


def demo(request: HttpRequest) -> HttpResponse:
    """The demo page: a fictional store's page with the widget's script tag."""
    return render(request, "demo.html", {"server_url": request.build_absolute_uri("/").rstrip("/")})
