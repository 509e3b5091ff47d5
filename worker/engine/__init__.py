"""The quantization engine (`qaas.worker.engine`).

It imports only the ML stack (torch, triton, transformers, safetensors, huggingface_hub) and never
the web or queue stack, so it runs unchanged on a GPU machine with only the ML stack installed and
can be used as a library.
"""
