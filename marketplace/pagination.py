"""How every API list is cut into pages: DRF's page numbers, with a page size a client may
choose up to a bound, and a named error for a page or a size that does not exist."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.pagination import PageNumberPagination

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100


class FlexPagination(PageNumberPagination):
    """``?page=N`` (from 1) and ``?page_size=N`` (1 to MAX_PAGE_SIZE, default PAGE_SIZE)."""

    page_size = PAGE_SIZE
    page_size_query_param = "page_size"
    max_page_size = MAX_PAGE_SIZE
    invalid_page_message = "There is no page {page_number}: {message}"

    def get_page_size(self, request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        size = int(raw) if raw.isascii() and raw.isdigit() else 0
        if not 1 <= size <= self.max_page_size:
            # DRF would quietly fall back to the default or the maximum; a client asking for
            # a size it cannot have is told which sizes there are.
            raise serializers.ValidationError(
                {
                    self.page_size_query_param: [
                        f"Must be a whole number from 1 to {self.max_page_size}."
                    ]
                }
            )
        return size
