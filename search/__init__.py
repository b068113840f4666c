"""lookalike.search — the index: what a point is, how to store it and how to query it.

This package imports nothing else of ours (dependencies point workers → ingest → search).
Heavy libraries (torch, sentence-transformers, qdrant) are imported inside the functions
that need them, so importing this package is cheap.
"""

__version__ = "0.1.0"
