"""Classify folders of images into a sharded, resumable Parquet dataset (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
