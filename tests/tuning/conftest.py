"""Tuning tests reuse the dashboard fixtures (users, knowledge base, scripted conversation)."""

from tests.dashboard.conftest import agent, agent2, conversation, customer_user, knowledge, staff  # noqa: F401
