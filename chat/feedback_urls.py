"""The widget's feedback API routes (included under ``/api/`` by ``config.urls``)."""

from django.urls import path

from chat import feedback_views

app_name = "chat_feedback"

urlpatterns = [
    path(
        "conversations/<uuid:conversation_id>/messages/<int:message_id>/feedback/",
        feedback_views.answer_feedback,
        name="answer_feedback",
    ),
    path("conversations/<uuid:conversation_id>/rating/", feedback_views.conversation_rating, name="conversation_rating"),
]
