"""qaas: quantization as a service.

This package holds what the API and the worker both import: settings, database models and the
job-request schema. It must stay free of heavy imports (no torch) so that the API process never
pays for the ML stack.
"""

__version__ = "0.1.0"
