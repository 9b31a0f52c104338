"""FLEX's URL map: the buyer website, the REST API and the Django admin."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic.base import RedirectView
from health_check.views import HealthCheckView

from marketplace.health import CHECKS

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("marketplace.api_urls")),
    path("health/", HealthCheckView.as_view(checks=CHECKS), name="health"),
    path("", include("marketplace.urls")),
    # Asked for by browsers on pages that name no icon (the admin's): FLEX's logo.
    path("favicon.ico", RedirectView.as_view(url=static("flex/logo.svg"), permanent=True)),
]
