"""Runs inside a notebook kernel (or any Python process): talks to the server over HTTP only."""

from .client import FineInferClient, FineInferError, discover

__all__ = ["FineInferClient", "FineInferError", "discover"]
