"""xDS scale benchmark: push latency to many simulated Envoys, and snapshot cost per model count.

Run with `python -m bench.xds_scale`; see docs/xds-scale.md.
"""
