"""Kept benchmarks (not tests): `make bench`, `make bench-memory`. Their figures are in the README."""
