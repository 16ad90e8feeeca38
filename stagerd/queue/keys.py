"""Redis key layout, derived from the queue name so that one Redis can host many queues.

With the default queue ``queue:unpack``:

- ``queue:unpack``                       producers' list (RPUSH JSON; consumers pop the left end)
- ``queue:unpack:dead``                  dead-letter list (JSON envelopes with the error)
- ``queue:unpack:processing:{worker}``   a worker's in-flight list (BLMOVE target)
- ``queue:unpack:heartbeat:{worker}``    a worker's heartbeat key (with a TTL)
- ``queue:unpack:workers``               set of worker ids that ever took a job
- ``queue:unpack:attempts``              hash batch_id -> attempts started
- ``queue:unpack:enqueued``              hash batch_id -> sha256 of the enqueued archive
                                         (transfer's exactly-once marker)
- ``queue:unpack:phase:{worker}``        hash batch_id -> phase/started_at JSON (for status)
- ``queue:unpack:epoch``                 lease epoch: INCR at every pickup (fencing tokens)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueKeys:
    """Every Redis key stagerd uses for one queue."""

    queue: str = "queue:unpack"

    @property
    def pending(self) -> str:
        return self.queue

    @property
    def dead(self) -> str:
        return f"{self.queue}:dead"

    @property
    def workers(self) -> str:
        return f"{self.queue}:workers"

    @property
    def attempts(self) -> str:
        return f"{self.queue}:attempts"

    @property
    def enqueued(self) -> str:
        return f"{self.queue}:enqueued"

    @property
    def epoch(self) -> str:
        return f"{self.queue}:epoch"

    def processing(self, worker: str) -> str:
        return f"{self.queue}:processing:{worker}"

    def heartbeat(self, worker: str) -> str:
        return f"{self.queue}:heartbeat:{worker}"

    def phase(self, worker: str) -> str:
        return f"{self.queue}:phase:{worker}"

    @property
    def janitor_lock(self) -> str:
        return f"{self.queue}:janitor"
