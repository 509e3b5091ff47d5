"""Triton kernels (imported as `qaas.kernels`), each beside a plain-torch reference.

Import submodules explicitly; this file imports nothing so that loading the package is free.
"""
