"""Deployment and local-stack helpers (not part of the installed `sagan` library)."""
