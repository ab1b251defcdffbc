"""Benchmarks of the recsys pipeline, each measured next to a bare-library baseline in the same run.

Run them with `make bench` (`python -m benchmarks.run`); figures are written to `docs/benchmarks.md`.
"""
