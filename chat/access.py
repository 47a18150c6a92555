"""Who may use the agent review dashboard: members of the "Agents" group, and staff.

Views use ``agent_required`` (anonymous users are redirected to ``LOGIN_URL``, logged-in users who
are not agents get 403); the agent websocket checks ``is_agent`` in ``connect()``.
"""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

# Created by the data migration ``chat.0002_dashboard_takeover_feedback``.
AGENTS_GROUP = "Agents"


def is_agent(user) -> bool:
    """Whether ``user`` (a ``User`` or ``AnonymousUser``) may use the dashboard: an active, logged-in
    staff member or member of the ``Agents`` group."""
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    return user.is_staff or user.groups.filter(name=AGENTS_GROUP).exists()


def agent_required(view):
    """View decorator: anonymous -> redirect to ``LOGIN_URL`` (with ``?next=``), logged in but not an
    agent -> ``PermissionDenied`` (403), agent -> the view."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not is_agent(request.user):
            raise PermissionDenied("the dashboard is for support agents")
        return view(request, *args, **kwargs)

    return wrapped
