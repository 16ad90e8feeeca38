"""The PostgreSQL edge: the batch ledger, results and failures, connections and migrations."""
