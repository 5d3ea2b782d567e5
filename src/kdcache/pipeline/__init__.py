"""Precompute: plan shards, run teachers in Ray actors over A views per sample, write the cache."""
