"""S3-over-HTTP fixtures (see the storage issue)."""
