"""Kept benchmarks (not tests), the `make bench*` targets. What each measures: benchmarks/README.md; figures:
benchmarks/results/."""
