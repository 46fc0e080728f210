"""Shared fixtures: real PostgreSQL (fixtures_pg.py), S3 over HTTP (fixtures_s3.py), the twill
model (fixtures_model.py), brokers and workers (fixtures_celery.py), the broker tests' roll
(fixtures_roll.py), hand-run ingest (fixtures_ingest.py) and the discovery tests' recording
context (fixtures_discovery.py)."""

import pytest

pytest_plugins = [
    "fixtures_pg",
    "fixtures_s3",
    "fixtures_model",
    "fixtures_celery",
    "fixtures_roll",
    "fixtures_ingest",
    "fixtures_discovery",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The opt-in tests on real AITEX data train on it: the suite's 15-minute limit per test
    (pytest-timeout, pyproject.toml) would cut a slow machine's run, so theirs is an hour."""
    for item in items:
        if item.get_closest_marker("aitex") is not None:
            item.add_marker(pytest.mark.timeout(3600))
