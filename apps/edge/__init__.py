"""The HTTP front (authenticate, read, authorize; relay): the FastAPI ingress, API keys, the
connection guard in front of it, and the stream wire between model replicas and clients."""
