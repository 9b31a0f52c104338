"""The REST API's URLs, under /api/."""

from django.urls import path

from marketplace.api import JoinChallengeApi, JoinCompleteApi

urlpatterns = [
    path("join/challenge/", JoinChallengeApi.as_view(), name="api-join-challenge"),
    path("join/complete/", JoinCompleteApi.as_view(), name="api-join-complete"),
]
