"""Shared fixtures: real PostgreSQL (fixtures_pg.py), S3 over HTTP (fixtures_s3.py), the twill
model (fixtures_model.py), brokers and workers (fixtures_celery.py), the broker tests' roll
(fixtures_roll.py), hand-run ingest (fixtures_ingest.py) and the discovery tests' recording
context (fixtures_discovery.py)."""

pytest_plugins = [
    "fixtures_pg",
    "fixtures_s3",
    "fixtures_model",
    "fixtures_celery",
    "fixtures_roll",
    "fixtures_ingest",
    "fixtures_discovery",
]
