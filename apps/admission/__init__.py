"""Reserve and admit: the shared rate limiter, the per-model admission gate (priorities, deadlines,
fair share) and the engines' KV capacity that sizes it."""
