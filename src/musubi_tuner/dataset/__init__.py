"""Dataset config, buckets, image items, caches and the batch loader used by training."""
