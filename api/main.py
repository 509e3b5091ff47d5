"""ASGI entry point: `uvicorn qaas.api.main:app` (settings from the environment)."""

from qaas.api.app import create_app

app = create_app()
