"""Alembic revisions for the PostgreSQL schema. Not built yet: see the storage issue."""
