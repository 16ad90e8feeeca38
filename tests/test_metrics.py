from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stagerd.metrics import Metrics, role_path


def test_role_path() -> None:
    assert role_path(Path("/x/stagerd.prom"), "gpu") == Path("/x/stagerd-gpu.prom")
    assert role_path(Path("/x/metrics"), "janitor") == Path("/x/metrics-janitor.prom")


def test_textfile_is_written_and_parses(tmp_path: Path) -> None:
    m = Metrics(tmp_path / "textfile" / "stagerd.prom", "gpu")
    m.batches.labels("done").inc(3)
    m.bytes.labels("in").inc(1024)
    m.phase_seconds.labels("staging").observe(2.5)
    m.queue_depth.set(7)
    m.scratch_free.set(10**9)
    m.write()
    text = (tmp_path / "textfile" / "stagerd-gpu.prom").read_text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("stagerd_batches_total", (("outcome", "done"),))] == 3
    assert samples[("stagerd_batches_total", (("outcome", "dead"),))] == 0
    assert samples[("stagerd_bytes_total", (("direction", "in"),))] == 1024
    assert samples[("stagerd_queue_depth", ())] == 7
    assert samples[("stagerd_phase_seconds_count", (("phase", "staging"),))] == 1
    # Atomic write: no temporary file is left beside it.
    assert [p.name for p in (tmp_path / "textfile").iterdir()] == ["stagerd-gpu.prom"]


def test_no_path_is_a_no_op(tmp_path: Path) -> None:
    m = Metrics(None, "janitor")
    m.janitor_actions.labels("removed").inc()
    m.write()
    assert m.path is None
