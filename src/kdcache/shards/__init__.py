"""Input shards: WebDataset tars as kdcache reads, counts and writes them.

Reading (:mod:`~kdcache.shards.reading`: shard lists and URLs, samples, keys, images; the tar
stream itself by :mod:`~kdcache.shards.tarstream`, a lean reader of regular files), sample
counts from headers, a manifest or a wids index (:mod:`~kdcache.shards.index`), the manifest
beside the shards (:mod:`~kdcache.shards.manifest`) and writing shards from image folders,
IDX files such as Fashion-MNIST, or synthetic data (:mod:`~kdcache.shards.writing`).

Imports: ``kdcache.core`` only.
"""
