"""Request and response schemas shared by the API and the worker."""
