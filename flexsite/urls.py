"""FLEX's URL map: the buyer website, the REST API and the Django admin."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("marketplace.api_urls")),
    path("", include("marketplace.urls")),
]
