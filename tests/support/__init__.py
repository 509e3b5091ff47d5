"""Test support code (fake Hub server and its fixtures). Import as `support.*` with `tests/` on sys.path."""
