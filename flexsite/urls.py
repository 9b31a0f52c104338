"""FLEX's URL map."""

from django.contrib import admin
from django.urls import path

from marketplace.api import JoinChallengeApi, JoinCompleteApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/join/challenge/", JoinChallengeApi.as_view(), name="api-join-challenge"),
    path("api/join/complete/", JoinCompleteApi.as_view(), name="api-join-complete"),
]
