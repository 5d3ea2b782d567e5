"""kdcache's benchmarks (``kdcache bench``): train, precompute, cache, parity.

Not a library package: it lives beside ``pipeline/`` and ``train/`` in a source checkout and
may import both (which they never do to each other). ``cache_tools.cli_bench`` finds it there.
Results and commands: ``docs/benchmarks.md``.
"""
