"""Settings from the environment and env files: typed, validated at the edge, secrets redacted."""
