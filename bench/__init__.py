"""Benchmarks of tokenvend against a bare FastAPI reference, measured in the same run.

`python -m bench` (or `make bench`) prints a comparison; it is not a test. See `bench/README.md`.
"""
