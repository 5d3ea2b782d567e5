"""The teacher-logit cache: a Zarr store of keys, labels, view parameters and teachers' targets.

The layout and its ``*Meta`` models (:mod:`~kdcache.cache.store`), creating and writing it shard
by shard (:mod:`~kdcache.cache.writer`), reading a shard's block back
(:mod:`~kdcache.cache.reader`), completion marks and damage checks
(:mod:`~kdcache.cache.integrity`, :mod:`~kdcache.cache.hierarchy`), adding views
(:mod:`~kdcache.cache.growth`) and the single-writer lock (:mod:`~kdcache.cache.lock`).

Imports: ``kdcache.core``, ``kdcache.views`` and ``kdcache.targets`` (never ``shards``).
"""
