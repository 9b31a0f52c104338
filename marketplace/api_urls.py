"""The REST API's URLs, under /api/, with its OpenAPI schema and browsable docs."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from marketplace import api, api_validation, api_wallet

urlpatterns = [
    path("auth/token/", api.AuthTokenObtainApi.as_view(), name="api-auth-token"),
    path("tasks/", api.TaskListApi.as_view(), name="api-task-list"),
    path("tasks/create/", api.TaskCreateApi.as_view(), name="api-task-create"),
    path("tasks/<int:pk>/", api.TaskDetailApi.as_view(), name="api-task-detail"),
    path("tasks/<int:pk>/updates/", api.TaskUpdateListApi.as_view(), name="api-task-updates"),
    path(
        "tasks/<int:pk>/transactions/",
        api.TaskTransactionListApi.as_view(),
        name="api-task-transactions",
    ),
    path("tasks/<int:pk>/cancel/", api.TaskCancelApi.as_view(), name="api-task-cancel"),
    path("tasks/<int:pk>/model/", api.TaskModelDownloadApi.as_view(), name="api-task-model"),
    path(
        "tasks/<int:pk>/validation/",
        api_validation.TaskValidationApi.as_view(),
        name="api-task-validation",
    ),
    path(
        "validation-sets/",
        api_validation.ValidationSetUploadApi.as_view(),
        name="api-validation-set-upload",
    ),
    path("open-tasks/", api.OpenTaskListApi.as_view(), name="api-open-task-list"),
    path("bids/", api.BidListApi.as_view(), name="api-bid-list"),
    path("bids/<int:pk>/", api.BidDetailApi.as_view(), name="api-bid-detail"),
    path("devices/", api.DeviceListApi.as_view(), name="api-device-list"),
    path("devices/<int:pk>/", api.DeviceDetailApi.as_view(), name="api-device-detail"),
    path("devices/me/", api.DeviceStatusApi.as_view(), name="api-device-status"),
    path("wallet/", api_wallet.WalletApi.as_view(), name="api-wallet"),
    path("wallet/withdraw/", api_wallet.WalletWithdrawApi.as_view(), name="api-wallet-withdraw"),
    path("join/challenge/", api.JoinChallengeApi.as_view(), name="api-join-challenge"),
    path("join/complete/", api.JoinCompleteApi.as_view(), name="api-join-complete"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
