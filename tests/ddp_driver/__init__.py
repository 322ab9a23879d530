"""Helpers for the multi-process tests: probe callbacks, a small config and a subprocess launcher."""
