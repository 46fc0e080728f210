"""The model: a student that reconstructs a frozen ImageNet teacher's features on good fabric,
its anomaly maps, training, calibration and evaluation.

Imports nothing of ours and no Celery, S3 or SQL, so the model can be trained, evaluated and
benchmarked without the pipeline (docs/architecture.md).
"""
