"""The buyer website's URLs."""

from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace import views
from marketplace.throttles import throttled

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path(
        "login/",
        throttled("login")(auth_views.LoginView.as_view(redirect_authenticated_user=True)),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # The old password is asked for: counted with the logins, against guessing it.
    path("password/", throttled("login")(views.PasswordChange.as_view()), name="password-change"),
    path(
        "password/reset/", throttled("reset")(views.PasswordReset.as_view()), name="password-reset"
    ),
    path(
        "password/reset/sent/",
        views.PasswordResetDone.as_view(),
        name="password-reset-done",
    ),
    path(
        "password/reset/<uidb64>/<token>/",
        views.PasswordResetConfirm.as_view(),
        name="password-reset-confirm",
    ),
    path(
        "password/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(
            template_name="registration/password_reset_complete.html"
        ),
        name="password-reset-complete",
    ),
    # The password is asked for: counted with the logins.
    path("account/email/", throttled("login")(views.account_email), name="account-email"),
    path("wallet/", views.wallet, name="wallet"),
    path("wallet/fund/", views.wallet_fund, name="wallet-fund"),
    path("wallet/withdraw/", views.wallet_withdraw, name="wallet-withdraw"),
    path("wallet/api-token/", views.api_token, name="api-token"),
    path("tasks/", views.task_list, name="task-list"),
    path("tasks/new/", views.task_create, name="task-create"),
    path("tasks/estimate/", views.task_estimate, name="task-estimate"),
    path("tasks/<int:pk>/", views.task_detail, name="task-detail"),
    path("tasks/<int:pk>/cancel/", views.task_cancel, name="task-cancel"),
    path("tasks/<int:pk>/model/", views.task_model, name="task-model"),
    path("tasks/<int:pk>/model/download/", views.task_model_download, name="task-model-download"),
    path("devices/owner/", views.device_owner_pass, name="device-owner-pass"),
    path("devices/<str:address>/", views.device_page, name="device-page"),
]
