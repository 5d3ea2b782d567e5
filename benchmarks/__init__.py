"""kdcache's benchmarks: train, precompute, cache, inspect, parity.

Not installed: run them from a source checkout with ``python -m benchmarks NAME`` (or the
``kdcache bench NAME`` front). They may import both ``kdcache.pipeline`` and ``kdcache.train``.
Results and commands: ``docs/benchmarks.md``.
"""
