"""The engine: the vLLM model replica, its engine arguments and placement, warm-up, token usage at
the engine, and the live replica-count policy."""
