"""Benchmarks: the programs `batch classify` is measured against, the pictures they run on, and the runner."""
