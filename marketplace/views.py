"""The buyer website: thin views over the buyer services and the selectors."""

from __future__ import annotations

import logging
import time
from datetime import UTC

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse, reverse_lazy
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_POST

from chain.errors import ChainUnavailableError, InvalidRoundsError, InvalidTrainerRangeError
from core.errors import FlexError
from core.units import wei_to_eth
from marketplace import contract, devices, estimates, selectors, services, wallets
from marketplace.estimates import CostEstimate
from marketplace.forms import (
    PRESETS,
    EmailForm,
    EstimateForm,
    PageForm,
    SignUpForm,
    TaskForm,
    TaskListFilterForm,
    WithdrawForm,
    explain,
)
from marketplace.model_check import model_check_request
from marketplace.models import PAY_REASONS, SETTLED_STATES, TaskOrder, Wallet
from marketplace.models_download import (
    ModelNotReadyError,
    NotTaskBuyerError,
    UnknownFormatError,
    export_record,
)
from marketplace.selectors import TaskView
from marketplace.sync.push import task_view_numbered
from marketplace.task_lists import LIST_CACHE_S, task_list_cache_key
from marketplace.task_page import (
    SNAPSHOT_CACHE_S,
    page_start,
    task_snapshot_key,
    task_update_message,
)
from marketplace.throttles import throttled

logger = logging.getLogger(__name__)

# Rows per page of the website's lists (the task list, a device's tasks).
LIST_PAGE_SIZE = 25
# The task list itself, without the page around it (the part that is cached).
TASK_LIST = "marketplace/_task_list.html"
TASK_TABLES = "marketplace/_task_tables.html"
# What the form's estimate starts from before the buyer types anything: the form's defaults.
_ESTIMATE_DEFAULTS = {
    name: TaskForm.base_fields[name].initial for name in ("rounds", "min_trainers", "max_trainers")
}


def home(request):
    return render(request, "home.html")


@throttled("signup")
def signup(request):
    if request.user.is_authenticated:
        return redirect("task-list")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = services.user_signup(
            username=form.cleaned_data["username"],
            password=form.cleaned_data["password1"],
            email=form.cleaned_data["email"],
        )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, "Welcome to FLEX. Your wallet is ready: fund it to post a task.")
        return redirect("wallet")
    return render(request, "registration/signup.html", {"form": form})


class PasswordChange(auth_views.PasswordChangeView):
    """Django's password change, which keeps this session and ends every other one (a
    session holds a hash of the password it began with); the account's API token goes too
    (marketplace.signals)."""

    template_name = "registration/password_change.html"
    success_url = reverse_lazy("wallet")

    def form_valid(self, form):
        response = super().form_valid(form)
        messages.success(
            self.request,
            "Your password is changed. Every other session is logged out, and the API token "
            "is revoked: make a new one below if you use the API.",
        )
        return response


def _reset_minutes() -> int:
    """How long a password-reset link works, in whole minutes."""
    return settings.PASSWORD_RESET_TIMEOUT // 60


class PasswordReset(auth_views.PasswordResetView):
    """Asks for the account's email address and mails a link that sets a new password (once,
    within PASSWORD_RESET_TIMEOUT). It answers the same whether or not an account has that
    address, so it tells nobody which addresses have accounts."""

    template_name = "registration/password_reset_form.html"
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"
    success_url = reverse_lazy("password-reset-done")

    def form_valid(self, form):
        self.extra_email_context = {"valid_minutes": _reset_minutes()}
        return super().form_valid(form)


class PasswordResetDone(auth_views.PasswordResetDoneView):
    template_name = "registration/password_reset_done.html"

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "valid_minutes": _reset_minutes()}


class PasswordResetConfirm(auth_views.PasswordResetConfirmView):
    """The mailed link: a new password, after which every session and the API token end
    (marketplace.signals)."""

    template_name = "registration/password_reset_confirm.html"
    success_url = reverse_lazy("password-reset-complete")


@login_required
def account_email(request):
    """The address password-reset links go to, changed only with the account's password."""
    form = EmailForm(request.POST or None, user=request.user, initial={"email": request.user.email})
    if request.method == "POST" and form.is_valid():
        services.user_email_set(user=request.user, email=form.cleaned_data["email"])
        messages.success(
            request,
            "Your email address is changed."
            if form.cleaned_data["email"]
            else "Your email address is removed: only an admin can reset your password now.",
        )
        return redirect("wallet")
    return render(request, "registration/email_change.html", {"form": form})


def _wallet(user) -> Wallet:
    """The user's wallet; accounts made outside sign-up (createsuperuser) get one on first use."""
    try:
        return wallets.wallet_of(user=user)
    except wallets.WalletMissingError:
        return services.wallet_create(user=user)


@login_required
def wallet(request, form: WithdrawForm | None = None, status: int = 200):
    account = _wallet(request.user)
    holdings, chain_id = None, None
    try:
        holdings = wallets.wallet_holdings(wallet=account)
        chain_id = contract.chain_id()
    except (FlexError, OSError):  # chain_id() is a plain web3 read
        messages.warning(request, "The chain cannot be reached right now.")
    return render(
        request,
        "marketplace/wallet.html",
        {
            "wallet": account,
            "balance_wei": holdings.wallet_wei if holdings else None,
            "credit_wei": holdings.credit_wei if holdings else None,
            "chain_id": chain_id,
            "faucet": holdings is not None and wallets.faucet_available(),
            "faucet_wei": settings.FLEX_FAUCET_WEI,
            "withdraw_form": form or WithdrawForm(),
            "api_token": selectors.api_token_get(user=request.user),
        },
        status=status,
    )


@login_required
@require_POST
def api_token(request):
    """Make the account's API token (the wallet page shows it), or with ``revoke`` delete it."""
    if "revoke" in request.POST:
        services.user_tokens_revoke(user=request.user)
        messages.success(request, "Your API token is revoked: requests that send it are refused.")
    else:
        services.user_token_issue(user=request.user)
        messages.success(request, "Your API token is ready: send it as Authorization: Token …")
    return redirect(reverse("wallet") + "#api-access")


@login_required
@require_POST
def wallet_withdraw(request):
    """Withdraw the wallet's credit: into the wallet at once, or to an external address after
    a confirmation page that shows the amount and the address."""
    account = _wallet(request.user)
    form = WithdrawForm(request.POST)
    if not form.is_valid():
        return wallet(request, form=form, status=400)
    to = form.cleaned_data["to"]
    if to and not form.cleaned_data["confirmed"]:
        try:
            credit = wallets.wallet_holdings(wallet=account).credit_wei
        except FlexError as exc:
            messages.error(request, exc.message)
            return redirect("wallet")
        return render(
            request,
            "marketplace/wallet_withdraw_confirm.html",
            {"wallet": account, "to": to, "credit_wei": credit},
        )
    try:
        done = services.wallet_withdraw(wallet=account, to=to or None)
    except FlexError as exc:
        messages.error(request, exc.message)
        return redirect("wallet")
    sent = f" and sent to {done.to}" if done.forward_tx else " into your wallet"
    messages.success(
        request,
        f"{wei_to_eth(done.amount_wei)} ETH withdrawn{sent}; "
        f"gas paid {wei_to_eth(done.fee_wei)} ETH.",
    )
    return redirect("wallet")


@login_required
@require_POST
@throttled("faucet")
def wallet_fund(request):
    try:
        services.wallet_fund(wallet=_wallet(request.user))
    except wallets.FaucetUnavailableError as exc:
        raise PermissionDenied(exc.message) from exc
    except ChainUnavailableError:
        messages.error(request, "The chain cannot be reached right now; nothing was sent.")
        return redirect("wallet")
    messages.success(request, f"{wei_to_eth(settings.FLEX_FAUCET_WEI)} test ETH added.")
    return redirect("wallet")


def _page_context(items, filters, context: dict) -> tuple[dict, int]:
    """The context of one page of ``items`` (the page ``filters`` names) as ``tasks``, the
    page as ``page_obj`` and its numbered links as ``page_range``, and the status: 404 naming
    the last page for one past it."""
    paginator = Paginator(items, LIST_PAGE_SIZE)
    number = filters.page_number()
    if number > paginator.num_pages:
        filters.add_error(
            "page",
            f"There is no page {number}: the last is page {paginator.num_pages}.",
        )
        return {**context, "filters": filters}, 404
    page = paginator.page(number)
    return {
        **context,
        "filters": filters,
        "page_obj": page,
        "tasks": page.object_list,
        "page_range": paginator.get_elided_page_range(number, on_each_side=2, on_ends=1),
    }, 200


def _page(request, template: str, items, filters, context: dict):
    """Render ``template`` with one page of ``items`` (_page_context)."""
    page_context, status = _page_context(items, filters, context)
    return render(request, template, page_context, status=status)


@login_required
def task_list(request):
    """The tasks the user may see, a page at a time, by state and in the sort asked for; the
    page links keep both in the query string. The list is rendered once per change of the
    user's tasks (marketplace.task_lists), the page around it at each request."""
    filters = TaskListFilterForm(request.GET)
    if not filters.is_valid():
        html = render_to_string(TASK_LIST, {"filters": filters}, request=request)
        return _task_list_page(request, html, status=400)
    key = task_list_cache_key(user=request.user, kind="page", url=request.get_full_path())

    def rendered() -> tuple[str, int]:
        tasks = selectors.task_view_list(user=request.user, **filters.selection())
        filtered = filters.selection() != {"state": None, "sort": "newest"}
        context, status = _page_context(tasks, filters, {"filtered": filtered})
        return render_to_string(TASK_LIST, context, request=request), status

    html, status = cache.get_or_set(key, rendered, LIST_CACHE_S)
    return _task_list_page(request, html, status=status)


def _task_list_page(request, html: str, *, status: int):
    # ``html`` is the list as TASK_LIST rendered it, every value in it escaped.
    return render(request, "marketplace/task_list.html", {"list": mark_safe(html)}, status=status)


def _estimate(data) -> tuple[CostEstimate | None, dict[str, list[str]]]:
    """The estimate for the shape in ``data`` (checked by the task form's rules and the
    contract's), or None with the errors by field ("__all__": the chain is unreachable)."""
    form = EstimateForm(data)
    if not form.is_valid():
        return None, {k: [str(m) for m in v] for k, v in form.errors.items()}
    try:
        return estimates.cost_estimate(**form.cleaned_data), {}
    except (InvalidRoundsError, InvalidTrainerRangeError) as exc:
        field = "rounds" if isinstance(exc, InvalidRoundsError) else "max_trainers"
        return None, {field: [explain(exc)]}
    except (FlexError, OSError):  # no estimate without the chain; the page still renders
        return None, {"__all__": ["The chain cannot be reached, so no estimate right now."]}


def _order_like(request) -> TaskOrder | None:
    """The buyer's own order named by ``?like=<task id>``, to start a new one from; 404 for
    another buyer's, one that does not exist or a malformed id, as the task page answers."""
    like = request.GET.get("like")
    if like is None:
        return None
    well_formed = like.isdecimal() and int(like) < 2**63  # an id the database can hold
    view = selectors.task_view_get(user=request.user, task_id=int(like)) if well_formed else None
    if view is None or view.order is None or view.order.buyer_id != request.user.pk:
        raise Http404("No such task of yours to start from.")
    return view.order


@login_required
@throttled("upload", when=lambda request: "validation_file" in request.FILES)
def task_create(request):
    like = _order_like(request) if request.method == "GET" else None
    initial = TaskForm.initial_like(like) if like is not None else None
    form = TaskForm(
        request.POST or None, request.FILES or None, buyer=request.user, initial=initial
    )
    account = _wallet(request.user)
    if request.method == "POST" and form.is_valid():
        try:
            order = services.task_create(buyer=request.user, **form.service_kwargs())
        except ChainUnavailableError:
            form.add_error(None, "The chain cannot be reached right now; nothing was sent.")
        except FlexError as exc:
            form.add_flex_error(exc)
        else:
            # A fact that stays true while the page follows the task past its bidding.
            messages.success(
                request,
                f"Your task is on chain. Devices may bid on it until "
                f"{order.bidding_ends.astimezone(UTC):%Y-%m-%d %H:%M} UTC.",
            )
            return redirect("task-detail", pk=order.chain_task_id)
    estimate, problems = _estimate(
        form.data if form.is_bound else {**_ESTIMATE_DEFAULTS, **(initial or {})}
    )
    try:
        balance = wallets.wallet_balance_wei(wallet=account)
    except ChainUnavailableError:
        balance = None
    return render(
        request,
        "marketplace/task_form.html",
        {
            "form": form,
            "estimate": estimate,
            "estimate_problem": " ".join(m for ms in problems.values() for m in ms),
            "presets": PRESETS,
            "balance_wei": balance,
            "wallet": account,
        },
    )


@login_required
@require_GET
def task_estimate(request):
    """The cost estimate as JSON for the task form's live panel: wei as strings (exact), shown
    in ETH by static/flex/units.js; 400 with the errors by field for a shape the form
    refuses, 503 without the chain."""
    estimate, problems = _estimate(request.GET)
    if estimate is None:
        unavailable = "__all__" in problems
        return JsonResponse(
            {
                "code": "chain_unavailable" if unavailable else "invalid",
                "message": " ".join(m for ms in problems.values() for m in ms),
                "fields": problems,
            },
            status=503 if unavailable else 400,
        )
    return JsonResponse(
        {
            "rounds": estimate.rounds,
            "min_trainers": estimate.min_trainers,
            "max_trainers": estimate.max_trainers,
            "minimum_wei": str(estimate.minimum_wei),
            "low_wei": str(estimate.low_wei),
            "high_wei": str(estimate.high_wei),
            "gas_wei": str(estimate.gas_wei),
            "gas_units": estimate.gas_units,
            "task_gas_wei": str(estimate.task_gas_wei),
            "task_gas_units": estimate.task_gas_units,
            "trainer_offers": len(estimate.trainer_prices_wei),
            "aggregator_offers": len(estimate.aggregator_prices_wei),
            "basis": estimate.basis,
        }
    )


def device_owner_pass(request):
    """Opens a device's page from a link its key signed (`python -m worker status` prints it):
    this browser may then see that device's page until the link's expiry."""
    try:
        device = devices.owner_pass_check(
            address=request.GET.get("address", ""),
            expires=request.GET.get("expires", ""),
            signature=request.GET.get("signature", ""),
        )
    except devices.OwnerPassError as exc:
        return render(request, "marketplace/device_pass_error.html", {"error": exc}, status=403)
    owned = dict(request.session.get(devices.OWNED_SESSION_KEY, {}))
    owned[device.address] = int(request.GET["expires"])
    request.session[devices.OWNED_SESSION_KEY] = owned
    return redirect("device-page", address=device.address)


def device_page(request, address: str):
    """A device's work and pay, for its owner (a signed link) and staff; 404 for anyone else,
    so others cannot tell which devices are enrolled."""
    device = selectors.device_get(address=address)
    until = request.session.get(devices.OWNED_SESSION_KEY, {}).get(device.address if device else "")
    if device is None or not (request.user.is_staff or (until and until > time.time())):
        raise Http404("No such device.")
    status = devices.device_status(device=device)
    filters = PageForm(request.GET)
    if not filters.is_valid():
        context = {"st": status, "filters": filters}
        return render(request, "marketplace/device.html", context, status=400)
    return _page(request, "marketplace/device.html", status["tasks"], filters, {"st": status})


def _task_view(request, pk: int) -> TaskView:
    """The task with chain id ``pk`` if the requester may see it; 404 otherwise, so others
    cannot tell it exists."""
    view = selectors.task_view_get(user=request.user, task_id=pk)
    if view is None:
        raise Http404("No such task.")
    return view


def _task_message(request, pk: int) -> tuple[TaskView, dict, str | None]:
    """The task, if the requester may see it (404 otherwise), its snapshot as its pages are
    first rendered, and where that snapshot is kept (task_snapshot_key; None: not kept)."""
    seq, view = task_view_numbered(user=request.user, task_id=pk)
    if view is None:
        raise Http404("No such task.")
    return view, task_update_message(view, seq=seq), task_snapshot_key(view, seq=seq)


@login_required
def task_detail(request, pk: int):
    """The task's page. Its tables (rounds, bids, transactions, nodes, pay: thousands of rows
    at the contract's limits) are rendered once per change of the task, beside its snapshot;
    the page around them at each request."""
    view, message, key = _task_message(request, pk)
    context = {"task": view, "s": message["snapshot"], "v": message["view"]}

    def rendered() -> str:
        return render_to_string(TASK_TABLES, context)

    # A function of the snapshot and of the block explorer its hashes link to.
    tables = (
        rendered()
        if key is None
        else cache.get_or_set(
            f"{key}:tables:{settings.FLEX_EXPLORER_URL}", rendered, SNAPSHOT_CACHE_S
        )
    )
    return render(
        request,
        "marketplace/task_detail.html",
        {
            **context,
            # Every value in it escaped by TASK_TABLES, a function of the snapshot alone.
            "tables": mark_safe(tables),
            "message": message,
            "page_start": page_start(message),
            "ws_path": f"/ws/tasks/{view.id}/",
            "ws_port": settings.FLEX_LIVE_PORT,
            "explorer": settings.FLEX_EXPLORER_URL,
        },
    )


@login_required
@require_POST
def task_cancel(request, pk: int):
    """Cancel the buyer's task while it is bidding; the budget comes back as wallet credit."""
    view = _task_view(request, pk)
    try:
        receipt = services.task_cancel(task=view, user=request.user)
    except NotTaskBuyerError as exc:
        raise Http404 from exc
    except FlexError as exc:
        messages.error(request, f"Not cancelled: {exc.message}")
    else:
        messages.success(
            request,
            f"Task cancelled in {receipt.tx_hash}: its budget of {wei_to_eth(view.budget_wei)} "
            "ETH is credited back to you; withdraw it from your wallet page.",
        )
    return redirect("task-detail", pk=pk)


@login_required
def task_model(request, pk: int):
    """The model card: the spec, how training went, who contributed and what each was paid."""
    view, message, _ = _task_message(request, pk)
    card = _model_card(view, message["snapshot"])
    # The model is called verified only once the platform's own check (off this request,
    # in the platform worker) recomputed it from the last round's updates.
    card["check"] = model_check_request(task=view.task) if view.task is not None else None
    return render(
        request,
        "marketplace/model_card.html",
        {"task": view, "s": message["snapshot"], "v": message["view"], "card": card},
    )


@login_required
def task_model_download(request, pk: int):
    """The final model: ``?as=`` flexmodel (the canonical blob, default), keras or npz."""
    view = _task_view(request, pk)
    try:
        model = services.task_model_download(
            task=view, user=request.user, fmt=request.GET.get("as", "flexmodel")
        )
    except NotTaskBuyerError as exc:
        raise Http404 from exc
    except UnknownFormatError as exc:
        return _download_error(request, view, exc, status=400)
    except ModelNotReadyError as exc:
        return _download_error(request, view, exc, status=409)
    except FlexError as exc:
        logger.warning("model download for task %s failed: %s", view.id, exc.message)
        return _download_error(request, view, exc, status=502)
    response = FileResponse(
        model.file,
        as_attachment=True,
        filename=model.filename,
        content_type="application/octet-stream",
    )
    response["X-Flex-Model-Id"] = model.model_id
    response["X-Flex-Round"] = str(model.round_number)
    response["X-Flex-Check"] = model.check
    return response


def _download_error(request, task: TaskView, exc: FlexError, *, status: int):
    return render(
        request,
        "marketplace/download_error.html",
        {"task": task, "error": exc},
        status=status,
    )


def _model_card(view: TaskView, snapshot: dict) -> dict:
    """What the model card shows, assembled from the task's snapshot and its spec."""
    rounds = [r for r in snapshot["rounds_published"] if r["number"] >= 1]
    ready = snapshot["state"] in ("trained", "finalized")
    final = rounds[-1] if ready and rounds else None
    # Pay for the work alone: stakes and bonds come back to the devices beside it, and are
    # no part of what the task cost its buyer (pay + refund = budget).
    paid: dict[str, int] = {}
    for payout in snapshot["payouts"]:
        if payout["reason"] in PAY_REASONS:
            paid[payout["account"]] = paid.get(payout["account"], 0) + int(payout["amount_wei"])
    # Nothing is paid before settlement: a dash then, as on the task page, not "0 ETH".
    settled = snapshot["state"] in SETTLED_STATES
    contributors = [
        {**node, "paid_wei": paid.get(node["device"], 0) if settled else None}
        for node in snapshot["selected"]
    ]
    spec = view.spec or {}
    aggregation = spec.get("aggregation") or {}
    spec_rows = [
        ("Model", spec.get("model")),
        ("Dataset", spec.get("dataset")),
        ("Rounds", spec.get("rounds")),
        ("Local epochs", spec.get("local_epochs")),
        ("Batch size", spec.get("batch_size")),
        ("Learning rate", spec.get("learning_rate")),
        ("Aggregation", aggregation.get("strategy")),
        ("Seed", spec.get("seed")),
    ]
    exported = export_record(model_id=final["global_model_id"]) if final else None
    stem = (
        f"flex-task-{view.id}-round-{final['number']}-{final['global_model_id']}" if final else ""
    )
    return {
        "ready": ready,
        "final": final,
        "exported": exported,
        "keras_name": f"{stem}.keras",
        "npz_name": f"{stem}.npz",
        "rounds": rounds,
        "contributors": contributors,
        "paid_total_wei": sum(paid.values()) if settled else None,
        "spec_rows": [(k, v) for k, v in spec_rows if v is not None],
    }
