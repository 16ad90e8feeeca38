"""The recovery rule (stagerd.recovery.decide) as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagerd.recovery import Decision, decide, died_reason

attempts = st.integers(min_value=-2, max_value=1000)
limits = st.integers(min_value=1, max_value=1000)
failures = st.none() | st.text(max_size=40)


@given(attempts, limits, st.booleans(), failures)
def test_a_live_owner_that_reports_nothing_keeps_its_job(attempt, limit, permanent, _) -> None:
    assert decide(attempt, limit, permanent=permanent, owner_alive=True) == Decision("leave")


@given(attempts, limits, st.booleans(), st.text(max_size=40))
def test_a_permanent_failure_is_dead_lettered_with_its_reason(
    attempt, limit, owner_alive, failure
) -> None:
    decision = decide(attempt, limit, permanent=True, owner_alive=owner_alive, failure=failure)
    assert decision == Decision("dead_letter", failure)


@given(attempts, limits, st.booleans(), failures, st.text(max_size=12))
def test_a_transient_failure_or_dead_owner_is_retried_until_the_limit(
    attempt, limit, owner_alive, failure, owner
) -> None:
    if failure is None:
        owner_alive = False  # nothing reported: only a dead owner leads to a decision
    decision = decide(
        attempt, limit, permanent=False, owner_alive=owner_alive, failure=failure, owner=owner
    )
    if attempt >= limit:
        expected = failure if failure is not None else died_reason(owner, attempt)
        assert decision == Decision("dead_letter", expected)
    else:
        assert decision == Decision("requeue")


@given(limits, st.booleans())
def test_an_uncounted_attempt_is_never_exhausted(limit, owner_alive) -> None:
    # A payload without a batch id has attempt 0: a dead owner's such job goes back.
    assert decide(0, limit, permanent=False, owner_alive=False).action == "requeue"
    assert decide(0, limit, permanent=False, owner_alive=owner_alive, failure="x").action == (
        "requeue"
    )


@given(attempts, limits, st.booleans(), st.booleans(), failures)
def test_only_dead_letters_carry_a_reason(attempt, limit, permanent, alive, failure) -> None:
    decision = decide(attempt, limit, permanent=permanent, owner_alive=alive, failure=failure)
    assert decision.action in ("requeue", "dead_letter", "leave")
    if decision.action != "dead_letter":
        assert decision.reason == ""


def test_the_died_reason_names_worker_and_attempt() -> None:
    assert decide(3, 3, permanent=False, owner_alive=False, owner="gpu-7") == Decision(
        "dead_letter", "worker gpu-7 died (heartbeat expired) on attempt 3"
    )


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        decide(1, limit, permanent=False, owner_alive=False)
