"""Process and operations plumbing: metrics, logs, processes, readiness, secrets."""
