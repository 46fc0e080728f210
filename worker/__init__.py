"""The pipeline: plain functions that ingest a frame, score a band and finalize a run, and the
Celery app and tasks that run them (docs/architecture.md)."""
