"""Root URL configuration."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from chat import health_views
from chat import views as chat_views

urlpatterns = [
    path("", chat_views.demo, name="demo"),
    path("healthz", health_views.healthz, name="healthz"),
    path("readyz", health_views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    # Agents sign in here: the admin's login page accepts staff only, and agents need not be staff.
    path("accounts/login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", include("chat.urls")),
    path("api/", include("chat.feedback_urls")),
    path("dashboard/", include("chat.dashboard.urls")),
    path("dashboard/corrections/", include("tuning.urls")),
    path("dashboard/fine-tunes/", include("tuning.run_urls")),
]

handler404 = "chat.views.not_found"
