"""Celery workers: the app is built from Settings in ``workers.celery_app``; thin tasks."""
