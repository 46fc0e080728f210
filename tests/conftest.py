"""Shared fixtures: real PostgreSQL (fixtures_pg.py) and S3 over HTTP (fixtures_s3.py)."""

pytest_plugins = [
    "fixtures_pg",
    "fixtures_s3",
    "fixtures_model",
    "fixtures_celery",
    "fixtures_roll",
]
