"""Root URL configuration."""

from django.contrib import admin
from django.urls import include, path

from chat import views as chat_views

urlpatterns = [
    path("", chat_views.demo, name="demo"),
    path("admin/", admin.site.urls),
    path("api/", include("chat.urls")),
    path("api/", include("chat.feedback_urls")),
    path("dashboard/", include("chat.dashboard.urls")),
    path("dashboard/corrections/", include("tuning.urls")),
]

handler404 = "chat.views.not_found"
