"""Identity verification of logged-in customers: the host site signs its user id, so a customer's
conversations follow them across devices and nobody else can claim them.

The scheme is Intercom's identity verification (``user_hash``) and Chatwoot's ``identifier_hash``:
each ``WidgetSite`` has a generated secret (``WidgetSite.identity_secret``, shown in the admin,
rotatable there). The host site's server, which knows who is logged in, computes

    user_hash = HMAC-SHA256(key=identity_secret, message=user_id), as 64 lower-case hex digits

(both UTF-8 encoded) and puts ``user_id`` and ``user_hash`` on the widget's script tag
(``data-user-id``, ``data-user-hash``). The secret never reaches a browser, so a visitor cannot sign
another user's id.

What is accepted, per request origin (the ``Origin`` header, which a page cannot forge):

- no ``user_id``: an anonymous conversation, as before; refused only when the site requires
  verification (``WidgetSite.identity_required``, "enforce": for a widget that only logged-in
  customers see);
- ``user_id`` with the right ``user_hash`` for *this origin's* secret: a verified customer;
- any other claim of a ``user_id`` (no hash, a wrong or malformed hash, a hash made with another
  site's secret, an origin with no ``WidgetSite`` row and so no secret) is refused with 403: an
  unverified claim is never stored, so a conversation's ``verified_user_id`` always means verified.

Hashes are compared in constant time (``hmac.compare_digest``). A verified customer is scoped to the
origin: user ``"42"`` of one site is not user ``"42"`` of another.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from chat import text_input
from chat.models import USER_ID_MAX_CHARS, WidgetSite

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")

HASH_REFUSED_MESSAGE = "user_hash is not the HMAC-SHA256 of user_id with this site's identity secret"
HASH_MISSING_MESSAGE = "user_id was sent without user_hash; a user id is accepted only when the site signs it"
NO_SECRET_MESSAGE = "identity verification is not set up for this site (admin: Widget sites)"
REQUIRED_MESSAGE = "this site's chat is for signed-in customers only: send user_id and user_hash"


class IdentityRefused(Exception):
    """A claimed identity was refused; ``status`` is the HTTP status to answer (400 for a malformed
    ``user_id``, 403 otherwise), the message says why."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Identity:
    """Who a widget request speaks for: ``user_id`` is the verified external user id of the host
    site (``None`` for an anonymous visitor); ``origin`` the site it was verified for."""

    origin: str
    user_id: str | None

    @property
    def verified(self) -> bool:
        return self.user_id is not None


def user_hash(secret: str, user_id: str) -> str:
    """``HMAC-SHA256(secret, user_id)`` as 64 lower-case hex digits, both UTF-8 encoded: what the
    host site computes (see the README's widget section for Python and Node one-liners)."""
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def identity_check(*, origin: str | None, user_id, hash_value, anonymous_allowed: bool = True) -> Identity:
    """Check a widget request's identity claim.

    ``origin``: the request's ``Origin`` header (``None``/empty when absent); ``user_id`` and
    ``hash_value``: the ``user_id`` and ``user_hash`` the request sent (``None`` when absent; any
    JSON value). ``anonymous_allowed``: whether no claim at all is acceptable (starting a
    conversation: yes unless the site enforces verification; listing one's conversations: no).

    Returns the ``Identity`` (``user_id`` ``None`` for an anonymous visitor). Raises
    ``IdentityRefused``: 400 when ``user_id`` is not a string of 1..``USER_ID_MAX_CHARS`` storable
    characters or ``user_hash`` comes without a ``user_id``; 403 for a missing, malformed or wrong hash,
    an origin without a ``WidgetSite`` row, or no claim where one is required. Reads one row.
    """
    site = WidgetSite.objects.filter(origin=origin).first() if origin else None
    if user_id is None:
        if hash_value is not None:
            raise IdentityRefused("user_hash was sent without user_id", 400)
        if not anonymous_allowed:
            raise IdentityRefused("send user_id and user_hash to list a signed-in customer's conversations", 403)
        if site is not None and site.identity_required:
            raise IdentityRefused(REQUIRED_MESSAGE)
        return Identity(origin=origin or "", user_id=None)
    if not isinstance(user_id, str) or not user_id or len(user_id) > USER_ID_MAX_CHARS:
        raise IdentityRefused(f"user_id must be a string of 1 to {USER_ID_MAX_CHARS} characters", 400)
    if text_input.is_unstorable(user_id):
        raise IdentityRefused(f"user_id {text_input.UNSTORABLE_REASON}", 400)
    if hash_value is None or hash_value == "":
        raise IdentityRefused(HASH_MISSING_MESSAGE)
    if site is None:
        raise IdentityRefused(NO_SECRET_MESSAGE)
    # compare_digest needs ASCII strings: anything else is malformed, and refused the same way.
    if not isinstance(hash_value, str) or not _HEX_DIGEST.fullmatch(hash_value):
        raise IdentityRefused(HASH_REFUSED_MESSAGE + " (expected 64 hex digits)")
    if not hmac.compare_digest(user_hash(site.identity_secret, user_id), hash_value.lower()):
        raise IdentityRefused(HASH_REFUSED_MESSAGE)
    return Identity(origin=site.origin, user_id=user_id)
