"""The GPU worker's role: the worker loop, one batch's pipeline, prefetch and resume."""
