"""Every test under tests/hostile is marked `hostile`: `make hostile` selects them, `make test` leaves them out."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/hostile/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.hostile)
