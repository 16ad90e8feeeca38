"""The Redis edge: the reliable queue (BLMOVE pickup, leases, heartbeats), its key layout and
Lua scripts, dead-worker recovery, the dead-letter list, the status snapshot, the error
classifier for the retry layer and the per-batch trail."""
