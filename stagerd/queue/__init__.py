"""The Redis edge: the reliable queue (BLMOVE pickup, leases, heartbeats), its key layout,
the dead-letter list and the per-batch trail."""
