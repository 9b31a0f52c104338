"""The marketplace's records: devices enrolled through join tokens (the chain mirror grows here)."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def token_digest(raw: str) -> str:
    """Only a token's SHA-256 is stored, so a database leak does not leak usable tokens."""
    return hashlib.sha256(raw.encode()).hexdigest()


class DeviceClass(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"
    JETSON = "jetson", "Jetson"


class JoinToken(models.Model):
    """A single-use, expiring invitation for one device to enrol."""

    label = models.CharField(max_length=100, help_text="Who or what the token is for.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    may_aggregate = models.BooleanField(
        default=False, help_text="The device may bid as an aggregator."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    challenge = models.CharField(max_length=66, blank=True, editable=False)
    challenge_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(expires_at__gt=models.F("created_at")),
                name="join_token_expires_after_creation",
            )
        ]

    def __str__(self) -> str:
        return f"{self.label} ({self.status})"

    @property
    def status(self) -> str:
        if self.used_at:
            return "used"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "valid"


class Device(models.Model):
    """An enrolled device: its chain address, its class and where its work is queued."""

    name = models.CharField(max_length=100)
    address = models.CharField(max_length=42, unique=True)
    device_class = models.CharField(max_length=10, choices=DeviceClass.choices)
    may_aggregate = models.BooleanField(default=False)
    dataplane_url = models.URLField(blank=True)
    join_token = models.OneToOneField(
        JoinToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="device"
    )
    enrolled_at = models.DateTimeField(default=timezone.now)
    registration_tx = models.CharField(max_length=66, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    @property
    def queue(self) -> str:
        from flexsite.celery import device_queue

        return device_queue(self.id)
