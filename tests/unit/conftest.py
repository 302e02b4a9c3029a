"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedlearn.server.store import Store


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    """A list a test appends its Stores to; each is closed at the end."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()
