"""Fine-tune routes of the dashboard (included under ``/dashboard/fine-tunes/`` by ``config.urls``)."""

from django.urls import path

from tuning import run_views

app_name = "fine_tunes"

urlpatterns = [
    path("", run_views.run_list, name="run_list"),
    path("start/", run_views.run_start, name="run_start"),
    path("<int:run_id>/", run_views.run_detail, name="run_detail"),
    path("evaluations/<int:evaluation_id>/report/", run_views.evaluation_report, name="evaluation_report"),
    path("versions/<int:version_id>/activate/", run_views.version_activate, name="version_activate"),
]
