"""The Celery app and its tasks (ingest, score, finalize, train). Not built yet: see the pipeline issue."""
