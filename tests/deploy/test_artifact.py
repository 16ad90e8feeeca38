"""The built artifact itself (dist/stagerd, not the package in this checkout) through the
whole flow: transfer upload -> gpu worker -> results in PostgreSQL -> janitor.

Every command runs as ``python dist/stagerd ...`` with no PYTHONPATH (so nothing from
this checkout can shadow the artifact's own copy), HOME=/dev/null and a SHIV_ROOT, as
systemd runs it. The sample processor is the artifact too, in interpreter mode.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.shivbuild import Artifact, session_artifact, session_shiv_root


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return session_artifact()


class ArtifactRunner:
    """Runs the artifact with a test's stagerd environment and nothing from the checkout."""

    def __init__(self, artifact: Artifact, stagerd_env: dict[str, str], cwd: Path) -> None:
        self.artifact = artifact
        self.cwd = cwd
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/dev/null",
            "SHIV_ROOT": str(session_shiv_root()),
            "STAGERD_LOG_LEVEL": "info",
            **stagerd_env,
        }

    def python_command(self) -> list[str]:
        return [sys.executable, str(self.artifact.path)]

    def __call__(
        self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.python_command(), *args],
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def last_json(stdout: str) -> Any:
    """The JSON object a command printed: the whole of stdout (maybe indented), else its
    last line that is one (progress lines may come before it)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1])


def test_built_artifact_runs_transfer_gpu_db_and_janitor(
    artifact: Artifact,
    stagerd_env: dict[str, str],
    tmp_path: Path,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    unique: str,
) -> None:
    run = ArtifactRunner(artifact, stagerd_env, tmp_path)
    batch_id = f"art-{unique}"
    archive = tmp_path / f"{batch_id}.tar"

    # The sample batch generator, from inside the artifact.
    made = run(
        ["-m", "stagerd.samples.makebatch", str(archive), "--files", "4"],
        env={"SHIV_INTERPRETER": "1"},
    )
    assert made.returncode == 0, made.stderr
    with tarfile.open(archive) as tf:
        members = sorted(m.name for m in tf.getmembers() if m.isfile())
    assert len(members) == 4

    uploaded = run(["transfer", "upload", str(archive), "--batch-id", batch_id])
    assert uploaded.returncode == 0, uploaded.stderr
    report = last_json(uploaded.stdout)
    assert report["batch_id"] == batch_id
    assert report["s3_key"] == f"archives/{batch_id}.tar"
    assert report["bytes"] == archive.stat().st_size
    assert report["enqueued"] is True
    assert redis_client.llen(queue_name) == 1

    # The processor is the artifact again, as a Python running the sample module.
    processor = shlex.join(
        ["env", "SHIV_INTERPRETER=1", *run.python_command(), "-m", "stagerd.samples.wavinfo"]
    )
    worked = run(["gpu", "--burst", "--processor", processor], timeout=240)
    assert worked.returncode == 0, worked.stderr[-4000:]
    assert redis_client.llen(queue_name) == 0
    assert redis_client.llen(f"{queue_name}:dead") == 0

    results = run(["db", "results", batch_id])
    assert results.returncode == 0, results.stderr
    ledger = json.loads(results.stdout)
    assert ledger["batch_id"] == batch_id
    assert ledger["state"] == "done"
    items = sorted(entry["item"] for entry in ledger["results"])
    assert [Path(item).name for item in items] == [Path(m).name for m in members]

    swept = run(["janitor", "--json"])
    assert swept.returncode == 0, swept.stderr
    summary = last_json(swept.stdout)
    for key in ("removed", "freed_bytes", "kept_locked", "requeued_jobs", "aborted_uploads"):
        assert key in summary
    assert summary["errors"] == []
    assert summary["requeued_jobs"] in ([], 0)
    # The worker cleaned up after itself: nothing but bookkeeping is left in scratch.
    assert [p.name for p in scratch_dir.iterdir() if not p.name.startswith(".")] == []

    # Secrets given in the environment never reach any command's output.
    for done in (uploaded, worked, results, swept):
        assert stagerd_env["S3_SECRET_KEY"] not in done.stdout + done.stderr
