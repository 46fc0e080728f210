"""PostgreSQL fixtures (see the storage issue)."""
