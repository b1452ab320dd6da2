"""Helpers for testing and benchmarking castore against real services (never imported by castore itself)."""

from castore.testing.seaweedfs import SeaweedFS, SeaweedFSError, find_weed

__all__ = ["SeaweedFS", "SeaweedFSError", "find_weed"]
