"""The jobs domain: submit, read, list, cancel, follow."""
