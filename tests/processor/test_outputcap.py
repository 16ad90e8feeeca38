"""stagerd.processor.outputcap: the per-batch logging budget (pure logic, a fake clock)."""

from __future__ import annotations

import logging

import pytest

from stagerd.processor.outputcap import OutputCap


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_head_is_logged_the_rest_dropped_but_each_streams_tail_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    cap = OutputCap(
        "b1", head_bytes=100, tail_bytes=30, rate=1000, burst=1000, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="stagerd"):
        for i in range(50):
            cap.line("stdout", f"line {i:03d}")
        cap.line("stderr", "the real error")
        for i in range(50, 60):
            cap.line("stdout", f"line {i:03d}")
        cap.finish()
    messages = logged(caplog)
    assert "processor stdout [b1]: line 000" in messages
    assert "processor stdout [b1]: line 011" not in messages  # over the 100-byte head
    assert "processor stdout [b1]: line 059" in messages  # the stdout tail
    assert "processor stderr [b1]: the real error" in messages  # stderr's own tail
    [summary] = [m for m in messages if "not logged" in m]
    assert "processor output of batch b1" in summary
    assert all(r.batch_id == "b1" for r in caplog.records)  # type: ignore[attr-defined]


def test_rate_limit_refills_with_time_and_budget_resets_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    cap = OutputCap("b1", head_bytes=10_000, tail_bytes=0, rate=2, burst=2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="stagerd"):
        for i in range(5):
            cap.line("stdout", f"x{i}")
        now[0] = 1.0
        cap.line("stdout", "after a second")
        assert cap.dropped_lines == 3
        cap.begin("b2")
        cap.line("stdout", "next batch")
    messages = logged(caplog)
    assert messages == [
        "processor stdout [b1]: x0",
        "processor stdout [b1]: x1",
        "processor stdout [b1]: after a second",
        "processor stdout [b2]: next batch",
    ]
