"""Training utilities for loraplex adapters."""
