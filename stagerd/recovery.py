"""Recovery as data: what happens to an in-flight job, decided by one pure function.

The worker (a failed attempt, :meth:`stagerd.queue.redis_queue.ReliableQueue.retry_or_dead`),
orphan recovery (the janitor and every worker's heartbeat thread,
:func:`stagerd.queue.orphans.recover_orphans`) and its dry-run planner only carry out what
:func:`decide` returns. The Lua scripts in :mod:`stagerd.queue.scripts` are the atomic
executors of the same rule inside Redis; ``tests/queue/test_recovery_lua.py`` runs them over
a table of cases and proves they decide exactly as :func:`decide` does.

No IO, no clock, no randomness: the same inputs always give the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["requeue", "dead_letter", "leave"]


@dataclass(frozen=True)
class Decision:
    """What to do with one in-flight job; *reason* is the dead letter's ``error`` text
    (empty unless *action* is ``"dead_letter"``)."""

    action: Action
    reason: str = ""


def decide(
    attempt: int,
    limit: int,
    *,
    permanent: bool,
    owner_alive: bool,
    failure: str | None = None,
    owner: str = "",
) -> Decision:
    """Decide the fate of an in-flight job.

    *attempt* is the job's attempt counted at pickup (0: never counted, an invalid payload
    without a batch id); *limit* is STAGERD_MAX_ATTEMPTS. Either the job's *owner* reports
    that its attempt ended with *failure* (*permanent* when retrying cannot help), or no
    failure is reported and *owner_alive* says whether the owner's heartbeat is live.

    The rule, first match wins:

    1. no failure reported and the owner is alive: ``leave`` (the job is being worked on);
    2. a permanent failure, or the attempts used up (``attempt >= limit``):
       ``dead_letter``, the reason being the failure or, when the owner died,
       ``worker {owner} died (heartbeat expired) on attempt {attempt}``;
    3. otherwise: ``requeue``.

    Where a requeued job goes is the executor's business, not the rule's: a failed attempt
    goes to the tail (other work first), a dead worker's jobs to the head (in order).

    Raises ValueError if *limit* < 1 (settings bound STAGERD_MAX_ATTEMPTS to 1..1000): with
    no attempt allowed, a job whose attempts are never counted would have no fate.
    """
    if limit < 1:
        raise ValueError(f"decide: limit {limit} is below 1")
    if failure is None and owner_alive:
        return Decision("leave")
    cause = failure if failure is not None else died_reason(owner, attempt)
    if permanent or attempt >= limit:
        return Decision("dead_letter", cause)
    return Decision("requeue")


def died_reason(owner: str, attempt: int) -> str:
    """The dead letter's ``error`` for a job whose worker died holding it (the Lua
    ``_RECOVER`` script writes the same text)."""
    return f"worker {owner} died (heartbeat expired) on attempt {attempt}"
