"""Correction routes of the dashboard (included under ``/dashboard/corrections/`` by ``config.urls``)."""

from django.urls import path

from tuning import views

app_name = "tuning"

urlpatterns = [
    path("", views.correction_list, name="correction_list"),
    path("answers/<int:message_id>/", views.correction_create, name="correction_create"),
    path("<int:correction_id>/review/", views.correction_review, name="correction_review"),
    path("<int:correction_id>/withdraw/", views.correction_withdraw, name="correction_withdraw"),
    path("curated/", views.curated_answer_list, name="curated_answer_list"),
    path("curated/<int:curated_id>/", views.curated_answer_edit, name="curated_answer_edit"),
]
