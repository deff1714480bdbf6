"""Shaping a request before it costs anything: validation against the endpoint table, token caps,
named system prompts and volatile-prefix hygiene."""
