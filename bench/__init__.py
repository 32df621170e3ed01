"""Benchmarks and load generators (not tests); run as modules from the repository root: python -m bench.<name>."""
