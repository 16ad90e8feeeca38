"""Hostile processors through the real worker (``stagerd gpu`` as the unprivileged user,
real S3, Redis and PostgreSQL): each must end its batch with a clear reason, leave no
process, no scratch and no secret behind, keep the log and the worker's memory bounded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from tests.hostile_support import HostileRun, MiB, WorkerRun, wait_gone
from tests.worker_support import make_tar, put_batch, scratch_leftovers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set up the user")

RSS_LIMIT = 200 * MiB
END = 'json.dumps({"stagerd": "end", "count": %d})'

DAEMON = """
import json, os, sys, time
pidfile = os.environ["PIDFILE"] + "." + os.environ["STAGERD_BATCH_ID"]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: holds a deleted 4 MiB file in scratch, lives forever
        with open("hold.bin", "wb") as f:
            f.write(b"x" * (4 << 20))
        hold = open("hold.bin", "rb")
        os.unlink("hold.bin")
        open(pidfile + ".tmp", "w").write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        while True:
            time.sleep(1)
    os._exit(0)
while not os.path.exists(pidfile):
    time.sleep(0.01)
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    out.write(json.dumps({"item": "a", "daemon": int(open(pidfile).read())}) + "\\n")
    out.write(json.dumps({"stagerd": "end", "count": 1}) + "\\n")
"""

DISK_FILL = """
import os, time
with open("fill.bin", "wb") as f:
    while True:  # 1 MiB every 50 ms until stopped; never writes results
        f.write(b"x" * (1 << 20))
        f.flush()
        time.sleep(0.05)
"""

FLOOD = """
import json, os, sys
line = "flood " + "x" * 93 + "\\n"
for _ in range(200_000):  # ~20 MiB of stdout
    sys.stdout.write(line)
sys.stdout.flush()
print("last words on stderr", file=sys.stderr)
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    out.write(json.dumps({"item": "a"}) + "\\n" + json.dumps({"stagerd": "end", "count": 1}) + "\\n")
"""

HUGE = """
import json, os
n = int(os.environ["ROWS"])
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    for i in range(n):
        out.write(json.dumps({"item": f"seg-{i:08d}", "text": "some words " * 6, "t": i}) + "\\n")
    out.write(json.dumps({"stagerd": "end", "count": n}) + "\\n")
"""

SECRET_HUNT = """
import json, os, stat
loot = os.environ["LOOT"]
found = {}
def grab(route, path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            found[route] = f.read(limit).decode("latin-1")
    except OSError as exc:
        found[route] = "denied: " + exc.strerror
found["env"] = json.dumps(dict(os.environ))
pid, chain = os.getpid(), []
while pid > 1:
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    chain.append(pid)
for pid in chain:
    for name in ("environ", "cmdline"):
        grab(f"{pid}/{name}", f"/proc/{pid}/{name}")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for tid in tasks:
        grab(f"{pid}/task/{tid}/environ", f"/proc/{pid}/task/{tid}/environ")
    try:  # the heap and stack of every ancestor, wherever maps lets us look
        maps = open(f"/proc/{pid}/maps").read().splitlines()
    except OSError as exc:
        maps = []
        found[f"{pid}/maps"] = "denied: " + exc.strerror
    chunks = []
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if "rw" in line.split()[1]:
                    try:
                        mem.seek(lo)
                        chunks.append(mem.read(min(hi - lo, 64 << 20)).decode("latin-1"))
                    except OSError:
                        pass
    except OSError as exc:
        chunks.append("denied: " + exc.strerror)
    found[f"{pid}/mem"] = "".join(chunks)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):  # pipes would block
                grab(f"{pid}/fd/{fd}", f"/proc/{pid}/fd/{fd}", 1 << 16)
    except OSError as exc:
        found[f"{pid}/fd"] = "denied: " + exc.strerror
for path in (os.environ.get("STAGERD_ENV_FILE", ""), "/etc/stagerd/stagerd.env"):
    if path:
        grab(f"file:{path}", path)
with open(os.path.join(loot, "loot.json"), "w") as out:
    json.dump(found, out)
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    out.write(json.dumps({"item": "hunt", "routes": sorted(found)}) + "\\n")
    out.write(json.dumps({"stagerd": "end", "count": 1}) + "\\n")
"""

CHMOD = """
import json, os
os.makedirs("out/a/b/c")
open("out/a/b/c/file", "w").write("x")
open("out/a/b/file", "w").write("x")
os.makedirs("out/zero/inner")
os.chmod("out/zero/inner", 0o000)
os.chmod("out/zero", 0o000)
os.chmod("out/a/b/c", 0o555)
os.chmod("out/a/b", 0o555)
os.chmod("out/a", 0o333)
for root, dirs, files in os.walk(os.environ["STAGERD_INPUT_DIR"], topdown=False):
    os.chmod(root, 0o555)
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    out.write(json.dumps({"item": "a"}) + "\\n" + json.dumps({"stagerd": "end", "count": 1}) + "\\n")
os.chmod(".", 0o555)
"""


@pytest.fixture
def hostile(stagerd_env: dict[str, str], unique: str) -> Iterator[HostileRun]:
    run = HostileRun(stagerd_env, f"hostile-{unique}")
    yield run
    run.close()


@pytest.fixture
def small_volume(stagerd_env: dict[str, str], unique: str) -> Iterator[HostileRun]:
    run = HostileRun(stagerd_env, f"hostile-{unique}", tmpfs=64 * MiB)
    yield run
    run.close()


@pytest.fixture
def ledger(database_url: str) -> Iterator[db.Ledger]:
    db.migrate(database_url)
    ledger = db.Ledger(database_url)
    yield ledger
    ledger.close()


def enqueue(s3_client: Any, redis_client: Any, s3_bucket: str, queue: str, *ids: str) -> None:
    for batch_id in ids:
        put_batch(s3_client, redis_client, s3_bucket, queue, batch_id, make_tar(files=2))


def assert_contained(run: HostileRun, worker: WorkerRun) -> None:
    """What every hostile run must show, whatever the processor did."""
    assert worker.returncode == 0, worker.log[-3000:]
    assert wait_gone(run.survivors()) == [], "a processor process survived the batch"
    assert scratch_leftovers(run.scratch) == []
    assert worker.peak_rss < RSS_LIMIT, worker.peak_rss
    assert "Traceback" not in worker.log, [
        ln[-3000:] for ln in worker.log.splitlines() if "Traceback" in ln
    ]


def test_daemonizing_processor_ends_with_its_batch(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "d1", "d2")
    pidfile = hostile.user_path("daemon.pid")
    worker = hostile.worker(hostile.script("daemon.py", DAEMON), PIDFILE=str(pidfile))
    assert_contained(hostile, worker)
    for batch_id in ("d1", "d2"):
        row = ledger.batch(batch_id)
        assert row is not None and row.state == "done", row
        [(_, result)] = ledger.results(batch_id)
        assert wait_gone([result["daemon"]]) == []


PERSISTENT_DAEMON = """
import json, os, sys, time
previous = None
for line in sys.stdin:
    req = json.loads(line)
    alive = previous is not None and os.path.exists(f"/proc/{previous}") and \\
        open(f"/proc/{previous}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            while True:
                time.sleep(1)
        os._exit(0)
    previous = int(os.read(r, 32))
    with open(req["results"], "w") as out:
        row = {"item": "a", "daemon": previous, "previous_daemon_alive": alive}
        out.write(json.dumps(row) + "\\n" + json.dumps({"stagerd": "end", "count": 1}) + "\\n")
    print(json.dumps({"batch_id": req["batch_id"], "ok": True}), flush=True)
"""


def test_persistent_processor_helpers_end_with_each_batch(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "p1", "p2")
    command = hostile.script("persistent.py", PERSISTENT_DAEMON)
    worker = hostile.worker(command, "--processor-mode", "persistent", "--prefetch", "0")
    assert_contained(hostile, worker)
    [(_, first)] = ledger.results("p1")
    [(_, second)] = ledger.results("p2")
    assert first["previous_daemon_alive"] is False
    assert second["previous_daemon_alive"] is False  # p1's daemon was killed when p1 ended


def test_disk_filling_processor_is_stopped_at_its_allowance(
    small_volume: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "f1")
    headroom = 16 * MiB
    worker = small_volume.worker(
        small_volume.script("fill.py", DISK_FILL),
        STAGERD_SCRATCH_BUDGET="40MiB",
        STAGERD_SCRATCH_HEADROOM="16MiB",
        STAGERD_PROCESS_SCRATCH_ALLOWANCE="8MiB",
    )
    assert_contained(small_volume, worker)
    assert worker.min_free >= headroom, worker.min_free
    row = ledger.batch("f1")
    assert row is not None and row.state == "dead" and row.attempts == 1, row
    assert row.error is not None and "STAGERD_PROCESS_SCRATCH_ALLOWANCE" in row.error


def test_processor_eating_the_headroom_is_stopped_before_the_disk_fills(
    small_volume: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    # Model weights beside scratch leave 44 MiB free; the allowance alone would let the
    # processor write 30 MiB, the headroom (16 MiB) stops it at ~28 MiB.
    (small_volume.scratch / "weights.bin").write_bytes(b"w" * (20 * MiB))
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "h1")
    worker = small_volume.worker(
        small_volume.script("fill.py", DISK_FILL),
        STAGERD_SCRATCH_BUDGET="40MiB",
        STAGERD_SCRATCH_HEADROOM="16MiB",
        STAGERD_PROCESS_SCRATCH_ALLOWANCE="30MiB",
    )
    (small_volume.scratch / "weights.bin").unlink()
    assert_contained(small_volume, worker)
    assert worker.min_free > 4 * MiB, worker.min_free  # never full, barely into the headroom
    row = ledger.batch("h1")
    assert row is not None and row.state == "dead" and row.attempts == 1, row
    assert row.error is not None and "STAGERD_SCRATCH_HEADROOM" in row.error


def test_log_flood_is_capped_per_batch(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "l1")
    worker = hostile.worker(hostile.script("flood.py", FLOOD))
    assert_contained(hostile, worker)
    assert worker.log_bytes < 512 * 1024, worker.log_bytes  # 20 MiB of output
    lines = [json.loads(line) for line in worker.log.splitlines() if line.startswith("{")]
    summary = [r for r in lines if "not logged" in r.get("msg", r.get("message", ""))]
    assert summary and summary[0]["batch_id"] == "l1" and summary[0]["dropped_bytes"] > 19 * MiB
    assert any("last words on stderr" in json.dumps(r) for r in lines)  # the tail is kept
    assert ledger.batch("l1").state == "done"  # type: ignore[union-attr]


def test_huge_results_stream_in_bounded_memory(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
    database_url: str,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "r1", "r2")
    command = hostile.script("huge.py", HUGE)
    rows = 200_000
    worker = hostile.worker(command, ROWS=str(rows), STAGERD_MAX_RESULTS=str(rows))
    assert_contained(hostile, worker)
    import psycopg

    with psycopg.connect(database_url) as conn:
        counts = dict(
            conn.execute(
                "SELECT batch_id, count(*) FROM stagerd_results GROUP BY batch_id"
            ).fetchall()
        )
    assert counts == {"r1": rows, "r2": rows}
    print(f"peak RSS with {rows} rows per batch: {worker.peak_rss / MiB:.1f} MiB")


def test_results_over_the_cap_end_the_batch(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "c1")
    worker = hostile.worker(
        hostile.script("huge.py", HUGE), ROWS="1001", STAGERD_MAX_RESULTS="1000"
    )
    assert_contained(hostile, worker)
    row = ledger.batch("c1")
    assert row is not None and row.state == "dead" and row.attempts == 1, row
    assert row.error is not None and "more than 1000 results (STAGERD_MAX_RESULTS)" in row.error
    assert ledger.results("c1") == []


def test_secret_hunting_processor_finds_nothing(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
    stagerd_env: dict[str, str],
    unique: str,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "s1")
    planted = f"hunter2-{unique}"
    loot = hostile.user_path("loot")
    loot.mkdir()
    os.chown(loot, hostile.uid, hostile.gid)
    worker = hostile.worker(
        hostile.script("hunt.py", SECRET_HUNT), LOOT=str(loot), STAGERD_TEST_PASSWORD=planted
    )
    assert_contained(hostile, worker)
    found = json.loads((loot / "loot.json").read_text())
    secrets = [stagerd_env["S3_SECRET_KEY"], planted]
    leaks = [route for route, text in found.items() for s in secrets if s in text]
    assert leaks == [], leaks
    # The routes were really tried: the worker's environ and memory were refused.
    denied = [route for route, text in found.items() if text.startswith("denied")]
    assert any(route.endswith("/environ") for route in denied), sorted(found)
    assert any(route.endswith("/mem") for route in denied), sorted(found)
    assert not any(s in worker.log for s in secrets)
    assert ledger.batch("s1").state == "done"  # type: ignore[union-attr]


def test_chmod_ing_processor_cannot_block_cleanup(
    hostile: HostileRun,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
) -> None:
    enqueue(s3_client, redis_client, s3_bucket, queue_name, "m1")
    worker = hostile.worker(hostile.script("chmod.py", CHMOD))
    assert_contained(hostile, worker)
    assert ledger.batch("m1").state == "done"  # type: ignore[union-attr]
    assert "PermissionError" not in worker.log


def test_janitor_as_the_user_removes_read_only_leftovers(hostile: HostileRun, run_cli: Any) -> None:
    from tests.unpriv import as_user

    stale = hostile.scratch / "stale-batch"
    make = (
        f"import os; os.makedirs('{stale}/a/b'); open('{stale}/a/b/f', 'w').write('x');"
        f"os.makedirs('{stale}/z/y'); os.chmod('{stale}/z/y', 0); os.chmod('{stale}/z', 0);"
        f"os.chmod('{stale}/a/b', 0o555); os.chmod('{stale}/a', 0o555); os.chmod('{stale}', 0o555)"
    )
    import subprocess
    import sys

    subprocess.run(as_user([sys.executable, "-c", make]), check=True)
    result = subprocess.run(
        as_user([sys.executable, "-m", "stagerd", "janitor", "--min-age", "0", "--json"]),
        env={**hostile.env, "REDIS_URL": hostile.env["REDIS_URL"]},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert scratch_leftovers(hostile.scratch) == []
    assert "PermissionError" not in result.stderr
