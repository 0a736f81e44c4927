"""Benchmarks for infergate: gateway overhead and config convergence. Run `python -m bench`."""
