"""Route: the cache-aware request router, the index of what each engine caches, prompts tokenized
for it, and keeping a request alive when its replica is lost (failover, resuming a stream)."""
