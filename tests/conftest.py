"""Shared fixtures: real PostgreSQL (fixtures_pg.py), S3 over HTTP (fixtures_s3.py), the twill
model (fixtures_model.py), brokers and workers (fixtures_celery.py), the broker tests' roll
(fixtures_roll.py) and hand-run ingest (fixtures_ingest.py)."""

pytest_plugins = [
    "fixtures_pg",
    "fixtures_s3",
    "fixtures_model",
    "fixtures_celery",
    "fixtures_roll",
    "fixtures_ingest",
]
