"""Benchmark: infergate's model server against MLServer on the same sklearn iris model."""
