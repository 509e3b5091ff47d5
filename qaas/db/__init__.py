"""Database models and session handling (SQLAlchemy 2), shared by the API and the worker."""
