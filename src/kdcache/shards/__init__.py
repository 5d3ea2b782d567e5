"""Input shards: WebDataset tars as kdcache reads, counts and writes them.

Reading (:mod:`~kdcache.shards.reading`: shard lists and URLs, samples, keys, images), sample
counts from headers, a manifest or a wids index (:mod:`~kdcache.shards.index`), the manifest
beside the shards (:mod:`~kdcache.shards.manifest`) and writing shards from image folders,
IDX files such as Fashion-MNIST, or synthetic data (:mod:`~kdcache.shards.writing`).

Imports: ``kdcache.core`` only.
"""
