"""Shared fixtures for the frontend tests: see tests/conftest.py (the real models and
their transformers references live there, shared with the runtime and CLI tests)."""
