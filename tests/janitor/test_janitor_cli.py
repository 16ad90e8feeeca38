"""``stagerd janitor`` as operators run it: real processes, real Redis, real S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue
from stagerd.scratch.locks import FileLock, is_locked
from stagerd.scratch.records import Record
from stagerd.scratch.space import ScratchManager
from tests.conftest import base_env

KEYS = [
    "removed",
    "freed_bytes",
    "kept_locked",
    "reservations_reclaimed",
    "requeued_jobs",
    "dead_lettered",
    "aborted_uploads",
    "errors",
    "reenqueued",
]

# A worker-like child: register with the queue, pop one job, reserve scratch for it and
# "extract" files into input/ until killed (or, with "live", heartbeat until stdin closes).
WORKER = r"""
import sys, time, threading
from pathlib import Path
import redis
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue
from stagerd.scratch.space import ScratchManager
from stagerd.scratch.records import Record

redis_url, queue, worker, root, mode = sys.argv[1:6]
q = ReliableQueue(redis.Redis.from_url(redis_url), QueueKeys(queue), worker, heartbeat_ttl=1.0)
q.register()
d = q.pop(timeout=5)
res = ScratchManager(Path(root), 2**30, 0).reserve(d.batch_id, 10 * 2**20)
q.set_phase(d, "staging")
(res.path / "input").mkdir()
if mode == "live":
    def beat():
        while True:
            q.heartbeat()
            time.sleep(0.2)
    threading.Thread(target=beat, daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read()
    sys.exit(0)
for i in range(100000):
    (res.path / "input" / f"{i:05d}.wav").write_bytes(b"\0" * 4096)
    if i == 20:
        print("READY", flush=True)
    time.sleep(0.001)
"""


@pytest.fixture
def env(stagerd_env: dict[str, str]) -> dict[str, str]:
    """The CLI environment without the ledger (its own test runs once stagerd.db.ledger lands)."""
    return {k: v for k, v in stagerd_env.items() if k != "DATABASE_URL"}


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_worker(env: dict[str, str], worker: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER,
            env["REDIS_URL"],
            env["STAGERD_QUEUE"],
            worker,
            env["STAGERD_SCRATCH_DIR"],
            mode,
        ],
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def janitor(run_cli: Any, env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli(["janitor", "--json", *args], env=env, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}, result.stderr


def wait_expired(redis_client: Any, key: str) -> None:
    deadline = time.monotonic() + 10
    while redis_client.exists(key):
        assert time.monotonic() < deadline, f"{key} never expired"
        time.sleep(0.05)


def test_sigkilled_worker_is_fully_recovered_beside_a_live_one(
    run_cli: Any, env: dict[str, str], redis_client: Any, queue_name: str, children: list
) -> None:
    keys = QueueKeys(queue_name)
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    redis_client.rpush(queue_name, Job.new("b-crash").to_json(), Job.new("b-busy").to_json())
    children.append(victim := start_worker(env, "w-victim", "extract"))
    children.append(busy := start_worker(env, "w-busy", "live"))
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert (scratch / "b-crash" / "input" / "00020.wav").exists()
    assert not is_locked(scratch / "b-crash") and is_locked(scratch / "b-busy")
    wait_expired(redis_client, keys.heartbeat("w-victim"))

    code, report, stderr = janitor(run_cli, env, "--min-age", "0")

    assert code == 0, stderr
    assert list(report) == KEYS
    assert report["removed"] == [str(scratch / "b-crash")]
    assert report["freed_bytes"] >= 20 * 4096
    assert report["kept_locked"] == [str(scratch / "b-busy")]
    assert report["reservations_reclaimed"] == ["b-crash"]
    assert report["requeued_jobs"] == ["b-crash"] and report["dead_lettered"] == []
    assert report["errors"] == []
    # the crashed batch: dir, reservation and in-flight entry gone, job back at the head
    assert not (scratch / "b-crash").exists()
    mgr = ScratchManager(scratch, 2**30, 0)
    assert [r.batch_id for r in mgr.status().reservations] == ["b-busy"]
    assert redis_client.llen(keys.processing("w-victim")) == 0
    assert Job.from_json(redis_client.lindex(queue_name, 0)).batch_id == "b-crash"
    # the busy worker is untouched: its dir, lock, reservation and in-flight job
    assert is_locked(scratch / "b-busy") and (scratch / "b-busy" / "input").is_dir()
    busy_in_flight = redis_client.lrange(keys.processing("w-busy"), 0, -1)
    assert [Job.from_json(raw).batch_id for raw in busy_in_flight] == ["b-busy"]
    # the batch is picked up elsewhere (attempt counted) and finished
    other = ReliableQueue(redis_client, keys, "w-other")
    other.register()
    delivery = other.pop(timeout=1)
    assert delivery is not None and delivery.batch_id == "b-crash" and delivery.attempt == 2
    with mgr.reserve("b-crash", 1024) as res:
        (res.path / "done").write_text("ok")
    other.ack(delivery)
    assert redis_client.llen(keys.processing("w-other")) == 0
    assert busy.poll() is None


def test_symlink_escapes_never_reach_outside(
    run_cli: Any, env: dict[str, str], tmp_path: Path
) -> None:
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    models = tmp_path / "models"
    (models / "gemma").mkdir(parents=True)
    (models / "gemma" / "weights.safetensors").write_bytes(b"g" * 65536)
    (scratch / "models").symlink_to(models)
    (scratch / "batch-x" / "input").mkdir(parents=True)
    (scratch / "batch-x" / "input" / "m").symlink_to(models / "gemma")
    (scratch / "batch-x" / "input" / "f").symlink_to(models / "gemma" / "weights.safetensors")
    (scratch / "root").symlink_to("/")
    code, report, stderr = janitor(run_cli, env, "--min-age", "0")
    assert code == 0, stderr
    assert sorted(report["removed"]) == sorted(
        str(scratch / n) for n in ("models", "batch-x", "root")
    )
    assert (models / "gemma" / "weights.safetensors").read_bytes() == b"g" * 65536
    assert sorted(os.listdir(scratch)) == [".stagerd"]


def test_dry_run_changes_nothing(
    run_cli: Any,
    env: dict[str, str],
    redis_client: Any,
    queue_name: str,
    s3_client: Any,
    s3_bucket: str,
) -> None:
    keys = QueueKeys(queue_name)
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    (scratch / "dead" / "input").mkdir(parents=True)
    (scratch / "dead" / "input" / "a.wav").write_bytes(b"a" * 9000)
    mgr = ScratchManager(scratch, 2**30, 0)
    res = mgr.reserve("gone", 100)
    res.release(remove=False)  # dir stays, unlocked
    mgr.records.write(Record.new("gone", 100))  # the record of an owner that died
    queue = ReliableQueue(redis_client, keys, "w-dead", heartbeat_ttl=0.2)
    queue.register()
    redis_client.rpush(queue_name, Job.new("b1").to_json())
    assert queue.pop(timeout=1) is not None
    wait_expired(redis_client, keys.heartbeat("w-dead"))
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="archives/b1.tar")

    def snapshot() -> tuple[Any, ...]:
        # Lock files are the only thing a dry run may create (empty, under .stagerd/).
        tree = sorted(
            (str(p), p.stat().st_size)
            for p in scratch.rglob("*")
            if p.is_file() and p.suffix != ".lock"
        )
        redis_state = sorted(
            (k, redis_client.type(k), redis_client.dump(k))
            for k in redis_client.keys(f"{queue_name}*")
        )
        uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        return tree, redis_state, sorted(u["UploadId"] for u in uploads)

    before = snapshot()
    code, report, stderr = janitor(
        run_cli, env, "--dry-run", "--min-age", "0", "--upload-max-age", "0"
    )
    assert code == 0, stderr
    assert sorted(report["removed"]) == [str(scratch / "dead"), str(scratch / "gone")]
    assert report["freed_bytes"] >= 9000
    assert report["reservations_reclaimed"] == ["gone"]
    assert report["requeued_jobs"] == ["b1"]
    assert report["aborted_uploads"] == ["archives/b1.tar"]
    assert snapshot() == before
    human = run_cli(["janitor", "--dry-run", "--min-age", "0"], env=env)
    assert human.returncode == 0 and "dry run: nothing was changed" in human.stdout
    assert snapshot() == before


def test_stale_uploads_aborted_fresh_kept_via_cli(
    run_cli: Any, env: dict[str, str], s3_client: Any, s3_bucket: str
) -> None:
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="archives/a.tar")
    code, report, stderr = janitor(run_cli, env, "--upload-max-age", "1h")
    assert code == 0, stderr
    assert report["aborted_uploads"] == []
    time.sleep(2.1)
    code, report, stderr = janitor(run_cli, env, "--upload-max-age", "1s")
    assert code == 0, stderr
    assert report["aborted_uploads"] == ["archives/a.tar"]
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_two_janitors_at_once_do_not_conflict(run_cli: Any, env: dict[str, str]) -> None:
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    for i in range(300):
        (scratch / f"stale-{i:03d}").mkdir()
        (scratch / f"stale-{i:03d}" / "x").write_bytes(b"x" * 100)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "stagerd", "janitor", "--json", "--min-age", "0"],
            env={**base_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    removed = [r for out, _ in outs for r in json.loads(out)["removed"]]
    assert sorted(removed) == sorted(str(scratch / f"stale-{i:03d}") for i in range(300))
    assert sorted(os.listdir(scratch)) == [".stagerd"]


def test_a_held_lock_makes_the_janitor_exit_0_saying_so(run_cli: Any, env: dict[str, str]) -> None:
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    (scratch / "stale").mkdir()
    (scratch / ".stagerd").mkdir()
    with FileLock(scratch / ".stagerd" / "janitor.lock"):
        result = run_cli(["janitor", "--min-age", "0"], env=env)
    assert result.returncode == 0
    assert "another janitor is running" in result.stderr
    assert (scratch / "stale").exists()


@pytest.mark.parametrize("root", ["/", "relative/scratch", "FILE"])
def test_refused_scratch_roots_exit_2(
    run_cli: Any, env: dict[str, str], tmp_path: Path, root: str
) -> None:
    if root == "FILE":
        root = str(tmp_path / "a-file")
        Path(root).write_text("not a dir")
    result = run_cli(["janitor"], env={**env, "STAGERD_SCRATCH_DIR": root})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("stagerd: error: ") and "Traceback" not in result.stderr


def test_redis_down_exits_1_after_the_other_parts(run_cli: Any, env: dict[str, str]) -> None:
    scratch = Path(env["STAGERD_SCRATCH_DIR"])
    (scratch / "stale").mkdir()
    code, report, stderr = janitor(
        run_cli, {**env, "REDIS_URL": "redis://:hunter2pw@127.0.0.1:1/0"}, "--min-age", "0"
    )
    assert code == 1
    assert report["removed"] == [str(scratch / "stale")]
    assert len(report["errors"]) == 1 and report["errors"][0].startswith("queue: ")
    assert "hunter2pw" not in json.dumps(report) + stderr


def test_no_s3_on_this_host_is_a_warning_not_a_failure(run_cli: Any, env: dict[str, str]) -> None:
    bare = {k: v for k, v in env.items() if not k.startswith("S3_")}
    code, report, stderr = janitor(run_cli, bare)
    assert code == 0, stderr
    assert report["errors"] == [] and "skipping uploads" in stderr


def test_bad_duration_is_a_usage_error(run_cli: Any, env: dict[str, str]) -> None:
    result = run_cli(["janitor", "--min-age", "soon"], env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "stagerd: error: --min-age: not a duration: 'soon' (examples: 30s, 15m, 24h)"
    ]


@pytest.mark.skipif(os.path.lexists("/data/scratch"), reason="this host has a real scratch")
def test_host_without_scratch_skips_the_local_parts(run_cli: Any, env: dict[str, str]) -> None:
    """A transfer host: the default /data/scratch does not exist, the rest still runs."""
    without = {k: v for k, v in env.items() if k != "STAGERD_SCRATCH_DIR"}
    code, report, stderr = janitor(run_cli, without)
    assert code == 0, stderr
    assert report["errors"] == [] and "skipping scratch" in stderr
