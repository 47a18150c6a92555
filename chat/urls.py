"""URLs of the chat widget's HTTP API (included under ``/api/`` by ``config.urls``)."""

from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("conversations/", views.conversation_create, name="conversation_create"),
    path("conversations/verified/", views.verified_conversations, name="verified_conversations"),
    path("conversations/<uuid:conversation_id>/resume/", views.conversation_resume, name="conversation_resume"),
    path("conversations/<uuid:conversation_id>/messages/", views.conversation_messages, name="conversation_messages"),
    path(
        "conversations/<uuid:conversation_id>/passages/<int:chunk_id>/",
        views.cited_passage,
        name="cited_passage",
    ),
    path("conversations/<uuid:conversation_id>/handoff/", views.conversation_handoff, name="conversation_handoff"),
]
