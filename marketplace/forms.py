"""The buyer website's forms: sign-up and the task form, with exact ETH amounts, and the
query strings of the pages that list."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm
from django.utils import timezone
from eth_utils import is_checksum_address, is_hex_address, to_checksum_address

from chain import errors as chain_errors
from chain.client import DEFAULT_SAMPLE_CAP
from chain.withdrawals import InvalidAddressError, destination
from core.errors import FlexError
from core.units import (
    MAX_AMOUNT_CHARS,
    AmountError,
    eth_to_wei,
    wei_to_eth,
    wei_to_eth_approx,
    wei_to_eth_short,
)
from dataplane.addresses import DataPlaneUrlError, dataplane_url_check
from dataplane.tls import CertificatePinError, pin_check
from marketplace import contract, wallets
from marketplace.models import Device, TaskState
from marketplace.selectors import TASK_LIST_SORTS
from marketplace.validation import ValidationSetUnknownError, bundled_id, validation_set_upload
from training import validation
from training.aggregation import STRATEGIES
from training.aggregation.functions import MAX_SAMPLES
from training.catalogue import MODELS, SCHEMAS
from training.errors import SpecError
from training.spec import LIMITS, MAX_LEARNING_RATE, AggregationSpec, TaskSpec

DEFAULT_ROUND_TIMEOUT_MIN = 10
DEFAULT_BIDDING_WINDOW = timedelta(minutes=15)
# The contract's caps (limits()) are checked by task_create against the chain itself; these
# only keep the inputs in a range the form can render.
MAX_TRAINERS_INPUT = 10_000
MAX_ROUND_TIMEOUT_MIN = 30 * 24 * 60


# The task list's sorts as the page offers them, in selectors.TASK_LIST_SORTS's order.
_SORT_LABELS = {
    "newest": "Newest first",
    "oldest": "Oldest first",
    "bidding_ends": "Bidding ends soonest",
}
TASK_LIST_SORT_CHOICES = [(key, _SORT_LABELS.get(key, key)) for key in TASK_LIST_SORTS]


class PageForm(forms.Form):
    """A list page's number, from its query string (``?page=``; 1 when absent)."""

    page = forms.IntegerField(required=False, min_value=1)

    def page_number(self) -> int:
        return self.cleaned_data["page"] or 1


class TaskListFilterForm(PageForm):
    """The task list's state filter, sort and page: what the page's links carry along."""

    state = forms.ChoiceField(
        required=False, choices=[("", "Any state"), *TaskState.choices], label="State"
    )
    sort = forms.ChoiceField(required=False, choices=TASK_LIST_SORT_CHOICES, label="Sort")

    def selection(self) -> dict[str, str | None]:
        """The selector's arguments (selectors.task_view_list)."""
        return {
            "state": self.cleaned_data["state"] or None,
            "sort": self.cleaned_data["sort"] or "newest",
        }


EMAIL_HELP = (
    "Optional. Where a link to set a new password goes if you forget yours; without it, "
    "only an admin can let you back in to your wallet."
)


class SignUpForm(UserCreationForm):
    """A buyer account; its custodial wallet is created with it."""

    email = forms.EmailField(required=False, help_text=EMAIL_HELP)

    class Meta(UserCreationForm.Meta):
        fields = ("username", "email")


class EmailForm(forms.Form):
    """The account's email address, changed only with its password: whoever holds the address
    can reset the password, and with it reach the wallet."""

    email = forms.EmailField(required=False, label="Email address", help_text=EMAIL_HELP)
    password = forms.CharField(
        label="Your password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_password(self):
        password = self.cleaned_data["password"]
        if not self.user.check_password(password):
            raise forms.ValidationError(
                "Your password was entered incorrectly.", code="password_incorrect"
            )
        return password


class WithdrawForm(forms.Form):
    """Where the wallet's credit goes: the wallet itself (``to`` empty) or an address."""

    to = forms.CharField(
        required=False,
        max_length=100,
        label="External address",
        widget=forms.TextInput(attrs={"placeholder": "0x...", "spellcheck": "false"}),
    )
    confirmed = forms.BooleanField(required=False, widget=forms.HiddenInput)

    def clean_to(self) -> str:
        value = self.cleaned_data["to"].strip()
        if not value:
            return ""
        try:
            return destination(value, market=contract.market())
        except InvalidAddressError as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from None


class EthAmountField(forms.CharField):
    """An amount of ETH typed as text, cleaned to an exact ``int`` of wei."""

    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", MAX_AMOUNT_CHARS)
        super().__init__(**kwargs)
        self.widget.attrs.update(inputmode="decimal", autocomplete="off", spellcheck="false")

    def clean(self, value):
        text = super().clean(value)
        if text in self.empty_values:
            return None
        try:
            return eth_to_wei(text)
        except AmountError as exc:
            raise forms.ValidationError(str(exc), code=exc.code) from None


# Each catalogue model's hyper-parameters, for the form's defaults and its model choice.
PRESETS = {key: dataclasses.asdict(entry.preset) for key, entry in MODELS.items()}
DEFAULT_PRESET = next(iter(MODELS.values())).preset


def _choices(entries) -> list[tuple[str, str]]:
    return [(key, f"{entry.title}") for key, entry in entries.items()]


class TaskForm(forms.Form):
    """Everything a buyer orders: the spec, the market terms and the budget."""

    title = forms.CharField(
        max_length=120, help_text="For you: shown in your task list; up to 120 characters."
    )
    dataset = forms.ChoiceField(choices=_choices(SCHEMAS), help_text="What the devices' data is.")
    model = forms.ChoiceField(choices=_choices(MODELS))
    rounds = forms.IntegerField(
        min_value=LIMITS["rounds"][0], initial=5, help_text="Federated-averaging rounds."
    )
    min_trainers = forms.IntegerField(min_value=1, max_value=MAX_TRAINERS_INPUT, initial=2)
    max_trainers = forms.IntegerField(min_value=1, max_value=MAX_TRAINERS_INPUT, initial=4)
    bidding_ends = forms.DateTimeField(
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"],
        help_text="UTC. Devices bid until then; selection follows.",
    )
    round_timeout_minutes = forms.IntegerField(
        label="Round timeout (minutes)",
        min_value=1,
        max_value=MAX_ROUND_TIMEOUT_MIN,
        initial=DEFAULT_ROUND_TIMEOUT_MIN,
        help_text="How long trainers and the aggregator get per round.",
    )
    dispute_window_minutes = forms.IntegerField(
        label="Dispute window (minutes)",
        required=False,
        min_value=0,
        max_value=MAX_ROUND_TIMEOUT_MIN,
        widget=forms.NumberInput(attrs={"placeholder": "the round timeout"}),
        help_text=(
            "How long after each global model its trainers may prove it wrong on chain; the "
            "task settles when the last model's window closes. Empty: the round timeout; 0: no "
            "challenges."
        ),
    )
    sample_cap = forms.IntegerField(
        label="Samples counted per trainer",
        min_value=1,
        max_value=MAX_SAMPLES,
        initial=DEFAULT_SAMPLE_CAP,
        help_text=(
            "A device's claim of how many samples it holds counts for at most this many, in "
            "selection and in its weight in the model: no device can buy its way in by "
            "claiming more."
        ),
    )
    budget = EthAmountField(
        label="Budget (ETH)",
        help_text="Held in escrow by the contract; what is not earned is refunded.",
    )
    # The hyper-parameters start at the preset of the first catalogue model; choosing another
    # model fills in its own (static/flex/task_form.js, from PRESETS).
    local_epochs = forms.IntegerField(
        min_value=LIMITS["local_epochs"][0],
        max_value=LIMITS["local_epochs"][1],
        initial=DEFAULT_PRESET.local_epochs,
        help_text="Passes each device makes over its own data per round.",
    )
    batch_size = forms.IntegerField(
        min_value=LIMITS["batch_size"][0],
        max_value=LIMITS["batch_size"][1],
        initial=DEFAULT_PRESET.batch_size,
        help_text="Samples per gradient step on a device: smaller steps more often.",
    )
    learning_rate = forms.FloatField(
        min_value=0,
        max_value=MAX_LEARNING_RATE,
        initial=DEFAULT_PRESET.learning_rate,
        help_text="How far each step moves the weights: too high diverges, too low crawls.",
    )
    aggregation = forms.ChoiceField(
        choices=[(key, key) for key in STRATEGIES],
        initial="fedavg",
        label="Aggregation",
        help_text="fedavg averages updates by samples; the median and trimmed mean resist "
        "outliers.",
    )
    seed = forms.IntegerField(
        min_value=LIMITS["seed"][0],
        max_value=LIMITS["seed"][1],
        initial=0,
        help_text="Fixes the initial weights and batch order, so the run can be repeated.",
    )
    validation_file = forms.FileField(
        required=False,
        label="Validation set",
        help_text=(
            "Updates are scored, and trainers paid, by what they add on it: .npz (arrays x, y) "
            f"or .csv (label column first), {validation.MIN_SAMPLES} to "
            f"{validation.MAX_SAMPLES} samples. Empty: the dataset's bundled held-out split."
        ),
        widget=forms.ClearableFileInput(attrs={"accept": ".npz,.csv"}),
    )
    # The validation set of the task this one is like (its content ID), kept unless a file is
    # uploaded instead; task_create takes it only if the buyer uploaded it.
    validation = forms.CharField(required=False, widget=forms.HiddenInput)

    # Where an error about a spec field or a contract argument is shown.
    SPEC_FIELDS = {
        "aggregation.strategy": "aggregation",
        "validation": "validation_file",
        "$": None,
        "version": None,
    }
    ERROR_FIELDS = {
        chain_errors.InvalidRoundsError: "rounds",
        chain_errors.InvalidTrainerRangeError: "max_trainers",
        chain_errors.InvalidBiddingEndError: "bidding_ends",
        chain_errors.InvalidRoundTimeoutError: "round_timeout_minutes",
        chain_errors.InvalidDisputeTermsError: "dispute_window_minutes",
        chain_errors.BudgetTooLowError: "budget",
        wallets.InsufficientFundsError: "budget",
        ValidationSetUnknownError: "validation_file",
    }

    @staticmethod
    def initial_like(order) -> dict:
        """The form's values for a task like ``order`` (a buyer's own): its spec, terms and
        budget, and its validation set unless it was the bundled split; a new bidding end."""
        spec = TaskSpec.from_dict(order.spec)
        return {
            "title": order.title,
            "dataset": spec.dataset,
            "model": spec.model,
            "rounds": spec.rounds,
            "min_trainers": order.min_trainers,
            "max_trainers": order.max_trainers,
            "round_timeout_minutes": max(order.round_timeout_s // 60, 1),
            # A window set in seconds (through the API) is kept whole: never shortened.
            "dispute_window_minutes": (
                None if order.dispute_window_s is None else -(-order.dispute_window_s // 60)
            ),
            "sample_cap": order.sample_cap or DEFAULT_SAMPLE_CAP,
            "budget": wei_to_eth(order.budget_wei),
            "local_epochs": spec.local_epochs,
            "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate,
            "aggregation": spec.aggregation.strategy,
            "seed": spec.seed,
            "validation": "" if spec.validation == bundled_id(spec.dataset) else spec.validation,
        }

    def __init__(self, *args, buyer, **kwargs):
        super().__init__(*args, **kwargs)
        self.buyer = buyer  # whose upload the validation file becomes
        # A browser would cut a longer title silently; the form says what the limit is.
        self.fields["title"].widget.attrs.pop("maxlength", None)
        if not self.is_bound:
            ends = timezone.now() + DEFAULT_BIDDING_WINDOW
            self.initial.setdefault("bidding_ends", ends.replace(second=0, microsecond=0))
        self.spec: TaskSpec | None = None

    def clean_bidding_ends(self):
        ends = self.cleaned_data["bidding_ends"]
        if ends <= timezone.now():
            raise forms.ValidationError(
                "Bidding must end in the future (times are UTC).", code="bidding_end_past"
            )
        return ends

    def clean_learning_rate(self):
        rate = self.cleaned_data["learning_rate"]
        if rate <= 0:
            raise forms.ValidationError("Must be greater than 0.", code="learning_rate_invalid")
        return rate

    def clean(self):
        data = super().clean()
        low, high = data.get("min_trainers"), data.get("max_trainers")
        if low is not None and high is not None and low > high:
            self.add_error("max_trainers", trainer_range_error(low))
        content_id = self._validation_set(data)
        spec_inputs = ("model", "dataset", "rounds", "local_epochs", "batch_size")
        if all(data.get(name) is not None for name in (*spec_inputs, "learning_rate", "seed")):
            try:
                self.spec = TaskSpec(
                    model=data["model"],
                    dataset=data["dataset"],
                    rounds=data["rounds"],
                    local_epochs=data["local_epochs"],
                    batch_size=data["batch_size"],
                    learning_rate=data["learning_rate"],
                    aggregation=AggregationSpec(strategy=data["aggregation"]),
                    seed=data["seed"],
                    validation=content_id,
                )
            except SpecError as exc:
                self.add_flex_error(exc)
        return data

    def _validation_set(self, data) -> str | None:
        """The uploaded validation set's content ID (stored), else the kept one's (``validation``),
        or None when neither was given."""
        upload = data.get("validation_file")
        if not upload or not data.get("dataset"):
            return data.get("validation") or None
        try:
            row = validation_set_upload(
                data=upload.read(validation.MAX_UPLOAD_BYTES + 1),
                filename=upload.name,
                dataset=data["dataset"],
                buyer=self.buyer,
            )
        except FlexError as exc:
            self.add_error("validation_file", forms.ValidationError(exc.message, code=exc.code))
            return None
        return row.content_id

    def service_kwargs(self) -> dict:
        """task_create's arguments from the cleaned form."""
        data = self.cleaned_data
        window = data["dispute_window_minutes"]
        return {
            "title": data["title"],
            "spec": self.spec,
            "min_trainers": data["min_trainers"],
            "max_trainers": data["max_trainers"],
            "bidding_ends": data["bidding_ends"],
            "round_timeout_s": data["round_timeout_minutes"] * 60,
            "dispute_window_s": None if window is None else window * 60,  # None: the timeout
            "sample_cap": data["sample_cap"],
            "budget_wei": data["budget"],
        }

    def add_flex_error(self, exc: FlexError) -> None:
        """Show a service or contract error beside the field it is about, with its code."""
        if isinstance(exc, SpecError):
            name = exc.fields.get("field", "")
            field = self.SPEC_FIELDS.get(name, name if name in self.fields else None)
            message = exc.fields.get("reason", exc.message)
            message = message[:1].upper() + message[1:]
        else:
            field = next((f for cls, f in self.ERROR_FIELDS.items() if isinstance(exc, cls)), None)
            message = explain(exc)
        self.add_error(field, forms.ValidationError(message, code=exc.code))


class EstimateForm(forms.Form):
    """The task's shape, for the live cost estimate: the task form's own fields and rules."""

    rounds = TaskForm.base_fields["rounds"]
    min_trainers = TaskForm.base_fields["min_trainers"]
    max_trainers = TaskForm.base_fields["max_trainers"]

    def clean(self):
        data = super().clean()
        low, high = data.get("min_trainers"), data.get("max_trainers")
        if low is not None and high is not None and low > high:
            self.add_error("max_trainers", trainer_range_error(low))
        return data


def trainer_range_error(low: int) -> forms.ValidationError:
    return forms.ValidationError(
        "Must be at least the minimum number of trainers (%(low)s).",
        code="trainer_range_invalid",
        params={"low": low},
    )


def explain(exc: FlexError) -> str:
    """A sentence for a buyer, from the error's fields (the same for a check and a revert)."""
    f = exc.fields
    if isinstance(exc, chain_errors.BudgetTooLowError):
        return (
            f"The contract needs at least {wei_to_eth(f['minimum_wei'])} ETH for this task: "
            "the minimum number of trainers and the aggregator at the platform's minimum "
            "prices, for every round."
        )
    if isinstance(exc, wallets.InsufficientFundsError):
        gas = f["needed_wei"] - f["budget_wei"]
        return (
            f"Your wallet holds {wei_to_eth_short(f['balance_wei'])} ETH; this task needs "
            f"{wei_to_eth(f['budget_wei'])} ETH and about {wei_to_eth_approx(gas)} ETH of gas."
            " Fund your wallet first."
        )
    if isinstance(exc, chain_errors.InvalidTrainerRangeError):
        if f["max_trainers"] > f["cap"]:
            return f"At most {f['cap']} trainers per task."
        return "The minimum must be at least 1 and not above the maximum."
    if isinstance(exc, chain_errors.InvalidRoundsError):
        return f"Between 1 and {f['max_rounds']} rounds."
    if isinstance(exc, chain_errors.InvalidRoundTimeoutError):
        return f"At most {f['max_round_timeout'] // 60} minutes."
    if isinstance(exc, chain_errors.InvalidBiddingEndError):
        return "Bidding must end in the future by the chain's clock (times are UTC)."
    return exc.message


class DeviceForm(forms.ModelForm):
    # The same rules as at enrolment: a plain https URL of a host, and the pinned certificate.
    dataplane_url = forms.CharField(required=False, max_length=300)
    dataplane_cert_sha256 = forms.CharField(
        required=False, max_length=100, label="Data-plane certificate SHA-256"
    )

    class Meta:
        model = Device
        fields = [
            "name",
            "address",
            "device_class",
            "may_aggregate",
            "dataplane_url",
            "dataplane_cert_sha256",
        ]

    def clean_dataplane_url(self) -> str:
        value = self.cleaned_data["dataplane_url"].strip()
        if not value:
            return ""
        try:
            return dataplane_url_check(value, allow_private=settings.FLEX_DATAPLANE_ALLOW_PRIVATE)
        except DataPlaneUrlError as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from None

    def clean_dataplane_cert_sha256(self) -> str:
        value = self.cleaned_data["dataplane_cert_sha256"].strip()
        try:
            return pin_check(value) if value else ""
        except CertificatePinError as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from None

    def clean_address(self) -> str:
        address = self.cleaned_data["address"].strip()
        if not is_hex_address(address):
            raise forms.ValidationError("Not a 20-byte hex Ethereum address.")
        if address != address.lower() and not is_checksum_address(address):
            raise forms.ValidationError("The address's checksum is wrong.")
        return to_checksum_address(address)
