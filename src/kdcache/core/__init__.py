"""The ground floor: what every other part shares and nothing here depends on.

Error classes (:mod:`~kdcache.core.errors`), typed config loading with dotted-key errors
(:mod:`~kdcache.core.config`), output path checks (:mod:`~kdcache.core.outputs`) and the typed
results every command returns and writes as JSON (:mod:`~kdcache.core.results`).

Imports: no other part of kdcache (enforced by ``tests/test_layering.py``).
"""
