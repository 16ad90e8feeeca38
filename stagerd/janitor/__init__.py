"""The janitor's role: recovery of dead workers, the scratch sweep, stale uploads, reconcile."""
