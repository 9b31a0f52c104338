"""The buyer website's URLs."""

urlpatterns: list = []
