"""Operator tools: ``status``, ``doctor`` and ``selfcheck``."""
