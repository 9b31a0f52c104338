"""What every admin page of the marketplace shares: exact wei columns, read-only mirror pages."""

from __future__ import annotations

from django.contrib import admin

from core.units import eth_text


def wei_column(field: str, description: str):
    """A list/detail column showing the wei amount in ``field`` exactly and in ETH."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        return eth_text(getattr(obj, field))

    column.__name__ = f"{field}_display"
    return column


class ReadOnlyAdminMixin:
    """Rows written by chain sync, or reported by the website and the nodes: never by hand."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyInline(ReadOnlyAdminMixin, admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True
