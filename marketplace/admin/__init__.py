"""The Django admin: enrolment (join tokens and devices, carried to the chain), the read-only
chain mirror, the buyers' orders and the nodes' reports."""

from django.contrib import admin

from marketplace.admin import enrolment, mirror

admin.site.site_header = "FLEX administration"
admin.site.site_title = "FLEX admin"

__all__ = ["enrolment", "mirror"]
