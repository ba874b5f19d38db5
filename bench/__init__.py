"""Benchmarks: scripts that print tables (run with `make bench`)."""
