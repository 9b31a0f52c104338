"""The marketplace: the chain mirror, lifecycle, buyer pages, API and admin."""
