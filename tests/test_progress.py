from __future__ import annotations

import io
import json
import threading

import pytest

from stagerd.progress import BarProgress, JsonProgress, NullProgress, make_progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_are_rate_limited_and_report_rate_and_eta() -> None:
    clock = FakeClock()
    out = io.StringIO()
    progress = JsonProgress("up", 1000, done=200, stream=out, interval=5.0, clock=clock)
    clock.now += 1
    progress.advance(100)  # within the interval: silent
    assert out.getvalue() == ""
    clock.now += 4
    progress.advance(100)  # 5 s after start: one line
    progress.close()
    progress.close()  # idempotent
    lines = _lines(out)
    assert len(lines) == 2
    first, final = lines
    assert first["event"] == "progress" and first["label"] == "up"
    assert first["bytes"] == 400 and first["total"] == 1000
    assert first["rate"] == 40  # 200 bytes in 5 s; the 200 already done do not count
    assert first["eta"] == 15.0  # 600 bytes left at 40 B/s
    assert first["percent"] == 40.0
    assert final["final"] is True and final["bytes"] == 400


def test_json_progress_without_rate_has_no_eta() -> None:
    out = io.StringIO()
    with JsonProgress("x", 10, stream=out, clock=FakeClock()):
        pass
    (line,) = _lines(out)
    assert line["eta"] is None and line["bytes"] == 0


def test_advance_is_thread_safe() -> None:
    out = io.StringIO()
    progress = JsonProgress("t", 8 * 1000, stream=out, interval=1e9)
    threads = [
        threading.Thread(target=lambda: [progress.advance(1) for _ in range(1000)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    assert _lines(out)[-1]["bytes"] == 8000


def test_make_progress_picks_json_off_a_terminal_and_bar_on_one() -> None:
    assert isinstance(make_progress("a", 1, stream=io.StringIO()), JsonProgress)
    assert isinstance(make_progress("a", 1, mode="none"), NullProgress)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = make_progress("upload", 2048, stream=tty)
    assert isinstance(bar, BarProgress)
    bar.advance(1024)
    bar.close()
    assert "upload" in tty.getvalue()
    with pytest.raises(ValueError, match="unknown progress mode"):
        make_progress("a", 1, mode="fancy")
