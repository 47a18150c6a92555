"""The agent review dashboard's routes (included under ``/dashboard/`` by ``config.urls``)."""

from django.urls import path

from chat.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.inbox, name="inbox"),
    path("inbox/list/", views.inbox_fragment, name="inbox_fragment"),
    path("analytics/", views.analytics_page, name="analytics"),
    path("conversations/<uuid:conversation_id>/", views.conversation, name="conversation"),
    path("conversations/<uuid:conversation_id>/transcript/", views.transcript_fragment, name="transcript_fragment"),
    path("conversations/<uuid:conversation_id>/take/", views.take, name="take"),
    path("conversations/<uuid:conversation_id>/hand-back/", views.hand_back, name="hand_back"),
    path("conversations/<uuid:conversation_id>/resolve/", views.resolve, name="resolve"),
    path("conversations/<uuid:conversation_id>/reviewed/", views.mark_reviewed, name="mark_reviewed"),
    path("conversations/<uuid:conversation_id>/messages/", views.send_message, name="send_message"),
]
