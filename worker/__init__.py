"""The worker (imported as `qaas.worker`): Celery app and tasks, and the quantization engine."""
