"""Teacher targets: the sparse form a cache stores and a loss consumes.

Top-k targets and their tail treatments (:mod:`~kdcache.targets.sparse`: ``SparseTargets``,
sampled and tempered targets, ensembles, the conversion to what a loss takes), how they are
encoded in the cache (:mod:`~kdcache.targets.encoding`: fp16, q8, sampled) and the draws of
sampled teachers (:mod:`~kdcache.targets.sampling`).

Imports: ``kdcache.core`` only.
"""
