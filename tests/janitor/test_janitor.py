"""The janitor's parts in-process: decisions, the scratch sweep, uploads, locks, skips."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from stagerd.config.settings import Settings
from stagerd.errors import ConfigError
from stagerd.janitor.run import (
    JanitorOptions,
    abort_stale_uploads,
    run_janitor,
    stale_uploads,
)
from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue
from stagerd.s3.boto import BotoStore
from stagerd.scratch.locks import FileLock
from stagerd.scratch.space import ScratchManager
from stagerd.scratch.sweep import (
    KEEP_LOCKED,
    KEEP_YOUNG,
    REMOVE,
    EntryFacts,
    check_scratch_root,
    decide,
    sweep_scratch,
)

MiB = 1024**2
OLD = 3600.0


def age(path: Path, seconds: float = OLD) -> None:
    """Make *path* look *seconds* old (mtime; ctime is 'now', so the sweep gets a clock)."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def cfg(settings: Settings) -> Settings:
    """This test's settings without the ledger (tested on its own, once migrated)."""
    return settings.replace(database_url=None)


def later(seconds: float = OLD) -> float:
    """A sweep clock *seconds* in the future: every entry made now looks that old."""
    return time.time() + seconds


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A fake /data/models that nothing may ever delete."""
    path = tmp_path / "models"
    (path / "whisperx").mkdir(parents=True)
    (path / "whisperx" / "model.bin").write_bytes(b"m" * 100_000)
    return path


def assert_models_intact(models: Path) -> None:
    assert (models / "whisperx" / "model.bin").read_bytes() == b"m" * 100_000


def stale_batch(root: Path, name: str, files: int = 3) -> Path:
    path = root / name
    (path / "input").mkdir(parents=True)
    for i in range(files):
        (path / "input" / f"{i}.wav").write_bytes(b"\0" * 8192)
    return path


# -- pure decisions --------------------------------------------------------------------


def test_decide_never_removes_a_locked_entry_whatever_its_age() -> None:
    assert decide(EntryFacts("b", "dir", True, 10**9), 0) == KEEP_LOCKED
    assert decide(EntryFacts("b", "dir", False, 10), 60) == KEEP_YOUNG
    assert decide(EntryFacts("b", "symlink", False, 61), 60) == REMOVE


def test_stale_uploads_by_initiated_time() -> None:
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    uploads: list[dict[str, Any]] = [
        {"Key": "archives/old.tar", "Initiated": now - timedelta(hours=25)},
        {"Key": "archives/new.tar", "Initiated": now - timedelta(hours=1)},
        {"Key": "archives/odd.tar"},
    ]
    stale = stale_uploads(uploads, now.timestamp(), 24 * 3600)
    assert [u["Key"] for u in stale] == ["archives/old.tar"]


# -- the scratch root -----------------------------------------------------------------


def test_scratch_root_refusals(tmp_path: Path, scratch_dir: Path) -> None:
    assert check_scratch_root(scratch_dir, scratch_dir) is True
    with pytest.raises(ConfigError, match="'/'"):
        check_scratch_root(Path("/"), Path("/"))
    stray = tmp_path / "file"
    stray.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_scratch_root(stray, stray)
    with pytest.raises(ConfigError, match="not the configured"):
        check_scratch_root(scratch_dir, tmp_path / "other")
    link = tmp_path / "link"
    link.symlink_to("/")
    with pytest.raises(ConfigError, match="'/'"):
        check_scratch_root(link, link)
    link2 = tmp_path / "link2"
    link2.symlink_to(scratch_dir)
    with pytest.raises(ConfigError, match="symlink"):
        check_scratch_root(link2, link2)
    with pytest.raises(ConfigError, match="absolute"):
        check_scratch_root(Path("scratch"), Path("scratch"))
    with pytest.raises(ConfigError, match="not a directory"):
        check_scratch_root(tmp_path / "missing", tmp_path / "missing")


# -- the sweep ------------------------------------------------------------------------


def test_sweep_removes_stale_keeps_locked_and_young(scratch_dir: Path) -> None:
    mgr = ScratchManager(scratch_dir, 100 * MiB, 0)
    live = mgr.reserve("live", MiB)
    (live.path / "input").mkdir()
    age(live.path)
    stale = stale_batch(scratch_dir, "dead")
    young = stale_batch(scratch_dir, "young")
    stray = scratch_dir / "partial.tar.part"
    stray.write_bytes(b"t" * 5000)
    now = time.time() + 600
    for path in (stale, stray):
        os.utime(path, (now - OLD, now - OLD))
    # ctime is "now" for everything, so age the clock instead for the stale ones
    result = sweep_scratch(scratch_dir, min_age=300, now=now)
    assert result.errors == []
    assert sorted(result.kept_locked) == [str(live.path)]
    # the clock is 600s ahead: everything unlocked is > 300s old, including "young"
    assert sorted(result.removed) == sorted(str(p) for p in (stale, stray, young))
    assert result.freed_bytes >= 3 * 8192 + 5000
    assert live.path.is_dir() and (live.path / "input").is_dir()
    assert (scratch_dir / ".stagerd").is_dir()
    again = stale_batch(scratch_dir, "fresh")
    result = sweep_scratch(scratch_dir, min_age=300)
    assert result.removed == [] and result.kept_young == 1 and again.is_dir()
    live.release()


def test_sweep_removes_symlinks_and_never_follows_them(scratch_dir: Path, models: Path) -> None:
    (scratch_dir / "models-link").symlink_to(models)
    (scratch_dir / "file-link").symlink_to(models / "whisperx" / "model.bin")
    (scratch_dir / "dangling").symlink_to(scratch_dir / "nope")
    batch = stale_batch(scratch_dir, "dead")
    (batch / "input" / "escape").symlink_to(models)
    (batch / "input" / "up").symlink_to("../../..")
    result = sweep_scratch(scratch_dir, min_age=60, now=later())
    assert result.errors == []
    assert len(result.removed) == 4
    assert os.listdir(scratch_dir) == []
    assert_models_intact(models)


def test_sweep_leaves_a_locked_symlink_target_and_fifos_alone(scratch_dir: Path) -> None:
    os.mkfifo(scratch_dir / "fifo")  # opening it would block: it must only be unlinked
    mgr = ScratchManager(scratch_dir, MiB, 0)
    with mgr.reserve("live", 1) as res:
        (scratch_dir / "alias").symlink_to(res.path)
        result = sweep_scratch(scratch_dir, min_age=0, now=later())
        assert sorted(result.removed) == sorted(
            [str(scratch_dir / "fifo"), str(scratch_dir / "alias")]
        )
        assert res.path.is_dir() and result.kept_locked == [str(res.path)]


def test_sweep_dry_run_changes_nothing(scratch_dir: Path, models: Path) -> None:
    stale_batch(scratch_dir, "dead")
    (scratch_dir / "link").symlink_to(models)
    before = sorted(str(p) for p in scratch_dir.rglob("*"))
    result = sweep_scratch(scratch_dir, min_age=0, dry_run=True, now=later())
    assert len(result.removed) == 2 and result.freed_bytes >= 3 * 8192
    assert sorted(str(p) for p in scratch_dir.rglob("*")) == before
    assert_models_intact(models)


# -- whole runs against real Redis and S3 ---------------------------------------------


def put_orphan(redis_client: Any, queue_name: str, worker: str, batch_id: str) -> None:
    """A worker that popped a job and died: its heartbeat is gone, the job is in flight."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), worker, heartbeat_ttl=0.2)
    queue.register()
    redis_client.rpush(queue_name, Job.new(batch_id).to_json())
    delivery = queue.pop(timeout=1)
    assert delivery is not None and delivery.batch_id == batch_id
    deadline = time.monotonic() + 5
    while redis_client.exists(QueueKeys(queue_name).heartbeat(worker)):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_run_recovers_orphans_and_reports(
    cfg: Settings, redis_client: Any, queue_name: str, scratch_dir: Path
) -> None:
    put_orphan(redis_client, queue_name, "dead-worker", "b-orphan")
    stale_batch(scratch_dir, "b-orphan")
    dry = run_janitor(cfg, JanitorOptions(dry_run=True, min_age=0))
    assert dry.requeued_jobs == ["b-orphan"] and dry.removed
    assert redis_client.llen(queue_name) == 0 and (scratch_dir / "b-orphan").exists()
    report = run_janitor(cfg, JanitorOptions(min_age=0), clock=later)
    assert report.errors == [], report.errors
    assert report.requeued_jobs == ["b-orphan"]
    assert report.removed == [str(scratch_dir / "b-orphan")]
    assert Job.from_json(redis_client.lindex(queue_name, 0)).batch_id == "b-orphan"
    assert redis_client.llen(QueueKeys(queue_name).processing("dead-worker")) == 0


def test_busy_local_lock_makes_the_second_janitor_a_no_op(cfg: Settings, scratch_dir: Path) -> None:
    stale_batch(scratch_dir, "dead")
    (scratch_dir / ".stagerd").mkdir(exist_ok=True)
    with FileLock(scratch_dir / ".stagerd" / "janitor.lock"):
        report = run_janitor(cfg, JanitorOptions(min_age=0), clock=later)
    assert report.busy and report.removed == [] and report.ok
    assert (scratch_dir / "dead").exists()


def test_busy_cluster_lock_skips_cluster_parts_only(
    cfg: Settings, redis_client: Any, queue_name: str, scratch_dir: Path
) -> None:
    put_orphan(redis_client, queue_name, "dead-worker", "b1")
    stale_batch(scratch_dir, "dead")
    redis_client.set(QueueKeys(queue_name).janitor_lock, "other", ex=30)
    report = run_janitor(cfg, JanitorOptions(min_age=0), clock=later)
    assert report.ok and report.requeued_jobs == []
    assert report.removed == [str(scratch_dir / "dead")]
    assert any("cluster lock" in s for s in report.skipped)
    assert redis_client.get(QueueKeys(queue_name).janitor_lock) == b"other"


def test_redis_down_fails_the_queue_part_but_the_rest_runs(
    cfg: Settings, scratch_dir: Path
) -> None:
    stale_batch(scratch_dir, "dead")
    down = cfg.replace(redis_url="redis://:topsecretpw@127.0.0.1:1/0")
    report = run_janitor(down, JanitorOptions(min_age=0), clock=later)
    assert report.removed == [str(scratch_dir / "dead")]
    assert [e.split(":")[0] for e in report.errors] == ["queue"]
    assert "topsecretpw" not in report.errors[0]
    assert any(s.startswith("ledger") for s in report.skipped)


def test_no_s3_settings_skips_uploads_without_failing(
    settings: Settings, redis_client: Any
) -> None:
    bare = settings.replace(s3_endpoint=None, s3_bucket=None, database_url=None)
    report = run_janitor(bare, JanitorOptions())
    assert report.ok
    assert [s.split(":")[0] for s in report.skipped] == ["uploads", "ledger", "reconcile"]


def test_stale_multipart_uploads_aborted_fresh_ones_kept(s3_client: Any, s3_bucket: str) -> None:
    old = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="archives/old.tar")
    s3_client.upload_part(
        Bucket=s3_bucket,
        Key="archives/old.tar",
        UploadId=old["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    time.sleep(1.2)  # Initiated has one-second resolution: make the two distinguishable
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="archives/new.tar")
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/old.tar")
    listed = s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    started = {u["Key"]: u["Initiated"].timestamp() for u in listed}
    assert started["archives/old.tar"] < started["archives/new.tar"]
    now = time.time() + 3600
    # a max age that falls between the two uploads' ages, whatever the wall clock says
    max_age = now - (started["archives/old.tar"] + started["archives/new.tar"]) / 2
    dry = abort_stale_uploads(
        BotoStore(s3_client), s3_bucket, max_age=max_age, now=now, dry_run=True
    )
    assert dry == ["archives/old.tar"]
    assert len(s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 3
    assert abort_stale_uploads(BotoStore(s3_client), s3_bucket, max_age=max_age, now=now) == [
        "archives/old.tar"
    ]
    left = sorted(u["Key"] for u in s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"])
    assert left == ["archives/new.tar", "elsewhere/old.tar"]


def test_ledger_marks_dead_workers_batches_requeued(
    settings: Settings,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    run_cli: Any,
    stagerd_env: dict[str, str],
) -> None:
    """Runs once stagerd.db.ledger (the worker engineer's ledger) is on the branch."""
    pytest.importorskip("stagerd.db.ledger")
    import psycopg

    migrated = run_cli(["db", "migrate"], env=stagerd_env)
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO stagerd_batches (batch_id, s3_key, state, attempts, worker, created_at,"
            " updated_at) VALUES ('b-led', 'archives/b-led.tar', 'processing', 1, 'dead-worker',"
            " now(), now()), ('b-live', 'archives/b-live.tar', 'processing', 1, 'live-worker',"
            " now(), now())"
        )
    put_orphan(redis_client, queue_name, "dead-worker", "b-led")
    report = run_janitor(settings, JanitorOptions())
    assert report.errors == [] and report.ledger_requeued == ["b-led"]
    with psycopg.connect(database_url) as conn:
        rows = dict(conn.execute("SELECT batch_id, state FROM stagerd_batches").fetchall())
    assert rows == {"b-led": "requeued", "b-live": "processing"}


def test_sweeping_beside_busy_workers_never_breaks_them(scratch_dir: Path) -> None:
    """Workers churn (reusing batch ids, leaving unlocked leftovers) while a janitor sweeps
    with no minimum age in a loop: no worker ever loses its dir or a file."""
    import threading

    mgr = ScratchManager(scratch_dir, 100 * MiB, 0, poll_interval=0.005)
    stop = threading.Event()
    errors: list[BaseException] = []
    sweeps = [0]

    def worker(n: int) -> None:
        try:
            for i in range(30):
                with mgr.reserve(f"w{n}-{i % 3}", MiB, timeout=30) as res:
                    (res.path / "input").mkdir()
                    for j in range(5):
                        (res.path / "input" / f"{j}.wav").write_bytes(b"\0" * 2048)
                    assert len(os.listdir(res.path / "input")) == 5
                if i % 4 == 0:
                    mgr.reserve(f"w{n}-{i % 3}", MiB, timeout=30).release(remove=False)
        except BaseException as exc:
            errors.append(exc)

    def janitor() -> None:
        while not stop.is_set():
            result = sweep_scratch(scratch_dir, min_age=0, now=later())
            mgr.reclaim_dead()
            if result.errors:
                errors.append(AssertionError(result.errors))
            sweeps[0] += 1

    sweeper = threading.Thread(target=janitor)
    sweeper.start()
    workers = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    sweeper.join(30)
    assert errors == [] and sweeps[0] > 0
    assert mgr.status().reservations == []
