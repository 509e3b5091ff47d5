"""Small sharp tools shared by the API and the worker: SSRF-safe HTTP, webhook signing and delivery."""
