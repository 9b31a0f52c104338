"""The admin of enrolment: join tokens, devices (carried to the chain) and buyers' wallets."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.db.models import Q
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html

from chain.errors import ContractError
from core.errors import FlexError
from core.units import eth_text
from marketplace import contract
from marketplace.admin.common import ReadOnlyAdminMixin
from marketplace.forms import DeviceForm
from marketplace.models import Device, JoinToken, Wallet
from marketplace.services import device_approve, device_revoke, join_token_issue, join_token_revoke
from marketplace.wallets import wallet_holdings

# ---------------------------------------------------------------- join tokens


class JoinTokenStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(s, s) for s in ("valid", "used", "revoked", "expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        unused = Q(used_at__isnull=True)
        live = unused & Q(revoked_at__isnull=True)
        wanted = {
            "used": Q(used_at__isnull=False),
            "revoked": unused & Q(revoked_at__isnull=False),
            "expired": live & Q(expires_at__lte=now),
            "valid": live & Q(expires_at__gt=now),
        }.get(self.value())
        return queryset if wanted is None else queryset.filter(wanted)


class JoinTokenIssueForm(forms.ModelForm):
    """Issuing a token: only its label, its aggregation right and how long it is valid."""

    valid_for_hours = forms.IntegerField(
        min_value=1, max_value=24 * 90, initial=24, help_text="Hours until the token expires."
    )

    class Meta:
        model = JoinToken
        fields = ["label", "may_aggregate"]


@admin.register(JoinToken)
class JoinTokenAdmin(admin.ModelAdmin):
    list_display = [
        "label",
        "status_display",
        "expires_at",
        "may_aggregate",
        "created_by",
        "created_at",
        "used_at",
        "device_display",
    ]
    list_filter = [JoinTokenStatusFilter, "may_aggregate", "created_at"]
    search_fields = ["label", "created_by__username", "device__address", "device__name"]
    list_select_related = ["created_by", "device"]
    date_hierarchy = "created_at"
    actions = ["revoke_tokens"]
    readonly_fields = [
        "label",
        "status_display",
        "may_aggregate",
        "created_by",
        "created_at",
        "expires_at",
        "used_at",
        "revoked_at",
        "device_display",
    ]

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = JoinTokenIssueForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["label", "may_aggregate", "valid_for_hours"]
        return self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    # A token is issued through its service, then never edited: revoked instead, and never
    # deleted, so that every enrolment keeps the invitation it came with.
    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_jointoken")

    def save_model(self, request, obj, form, change) -> None:
        data = form.cleaned_data
        issued = join_token_issue(
            label=data["label"],
            ttl=timedelta(hours=data["valid_for_hours"]),
            may_aggregate=data["may_aggregate"],
            created_by=request.user,
        )
        # The admin goes on with ``obj`` (history entry, redirect): make it the issued row.
        for field in JoinToken._meta.concrete_fields:
            setattr(obj, field.attname, getattr(issued.token, field.attname))
        obj._state.adding = False
        self.message_user(
            request,
            format_html(
                "Join token for “{}” issued, valid until {}. Copy it now, it is not shown "
                "again: <code>{}</code> (on the device: <code>python -m worker join {} {} "
                "--home DIR --data YOUR_DATA.npz</code>)",
                obj.label,
                obj.expires_at.isoformat(timespec="seconds"),
                issued.raw,
                request.build_absolute_uri("/").rstrip("/"),
                issued.raw,
            ),
            messages.WARNING,
        )

    @admin.display(description="status")
    def status_display(self, obj: JoinToken) -> str:
        return obj.status

    @admin.display(description="device")
    def device_display(self, obj: JoinToken) -> str:
        device = getattr(obj, "device", None)
        return str(device) if device else "-"

    @admin.action(description="Revoke the selected join tokens", permissions=["revoke"])
    def revoke_tokens(self, request, queryset) -> None:
        revoked, skipped = 0, []
        for token in queryset:
            if token.status != "valid":
                skipped.append(f"{token.label} ({token.status})")
                continue
            join_token_revoke(token=token)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} join token(s).", messages.SUCCESS)
        if skipped:
            self.message_user(
                request, "Not revoked, no longer valid: " + ", ".join(skipped), messages.WARNING
            )


# ---------------------------------------------------------------- devices


def _chain_error_text(exc: FlexError) -> str:
    """A revert by its Solidity name (what the contract docs list), other errors by code."""
    name = exc.solidity_name if isinstance(exc, ContractError) and exc.solidity_name else exc.code
    return f"{name}: {exc.message}"


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    form = DeviceForm
    list_display = [
        "name",
        "short_address",
        "device_class",
        "may_aggregate",
        "chain_status",
        "enrolled_at",
        "join_token",
    ]
    list_filter = ["chain_status", "device_class", "may_aggregate", "enrolled_at"]
    search_fields = ["name", "address", "join_token__label"]
    list_select_related = ["join_token"]
    actions = ["approve_devices", "revoke_devices"]
    readonly_fields = [
        "chain_status",
        "chain_live",
        "enrolled_at",
        "registration_tx",
        "join_token",
    ]

    def get_readonly_fields(self, request, obj=None):
        # A device is its chain address: changing it would silently swap the registration.
        return self.readonly_fields + (["address"] if obj else [])

    # Revoke instead: bids, selections and payouts name the device's address.
    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="address", ordering="address")
    def short_address(self, obj: Device) -> str:
        return format_html(
            '<span title="{}">{}…{}</span>', obj.address, obj.address[:8], obj.address[-4:]
        )

    @admin.display(description="on chain now")
    def chain_live(self, obj: Device) -> str:
        if not obj.pk:
            return "-"
        try:
            info = contract.market().device(device=obj.address)
        except FlexError as exc:
            return f"unknown ({_chain_error_text(exc)})"
        aggregate = ", may aggregate" if info.can_aggregate else ""
        return f"{info.status.name.lower()} ({info.device_class.name.lower()}{aggregate})"

    def _carry_to_chain(self, request, queryset, *, service, done: str) -> None:
        """Run ``service`` for each device and report the chain's answer for each (its chain
        status here follows once chain sync mirrors the event)."""
        for device in queryset:
            try:
                receipt = service(device=device)
            except FlexError as exc:
                self.message_user(
                    request,
                    f"{device.name}: the chain refused: {_chain_error_text(exc)}",
                    messages.ERROR,
                )
                continue
            self.message_user(
                request,
                f"{device.name}: {done} on chain in block {receipt.block_number} "
                f"(tx {receipt.tx_hash}); its status here follows when chain sync sees it.",
                messages.SUCCESS,
            )

    # Both send a transaction from the registrar: only for staff who may change devices.
    @admin.action(
        description="Approve: register the selected devices on chain", permissions=["change"]
    )
    def approve_devices(self, request, queryset) -> None:
        self._carry_to_chain(request, queryset, service=device_approve, done="registered")

    @admin.action(description="Revoke the selected devices on chain…", permissions=["change"])
    def revoke_devices(self, request, queryset):
        """Asks first (a revocation cannot be undone by approving again), then revokes."""
        if request.POST.get("confirmed") != "yes":
            return TemplateResponse(
                request,
                "admin/marketplace/device/revoke_confirmation.html",
                {**self.admin_site.each_context(request), "devices": list(queryset)},
            )
        self._carry_to_chain(request, queryset, service=device_revoke, done="revoked")
        return None


@admin.register(Wallet)
class WalletAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["user", "address", "balance", "credit", "created_at"]
    search_fields = ["user__username", "address"]
    fields = ["user", "address", "balance", "credit", "created_at"]  # never the encrypted key

    @admin.display(description="balance")
    def balance(self, obj: Wallet) -> str:
        return self._holding(obj, "wallet_wei")

    @admin.display(description="credit in the contract")
    def credit(self, obj: Wallet) -> str:
        return self._holding(obj, "credit_wei")

    def _holding(self, obj: Wallet, field: str) -> str:
        # One read of the chain per row for both columns.
        if not hasattr(obj, "_held"):
            try:
                obj._held = wallet_holdings(wallet=obj)
            except (FlexError, OSError):
                obj._held = None
        return "chain unreachable" if obj._held is None else eth_text(getattr(obj._held, field))
