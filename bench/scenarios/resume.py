"""resume: SIGKILL an upload once S3 holds half the file, rerun it, count the bytes re-sent.

"Half" is observed on the server, the same way for every tool: ListMultipartUploads +
ListParts are polled and the whole process group is SIGKILLed once the completed parts add up
to >= 50% of the file. stagerd's rerun reports what it sent (``uploaded_bytes``) and what it
found and verified (``resumed_bytes``). The peers have no resume across processes: their rerun
re-sends the whole file, which the harness confirms by observing that the killed upload's
UploadId is still pending (orphaned, not continued) after the rerun completed. A peer that
finishes before half its parts are listed (rclone sends files under its 200 MiB cutoff in one
PUT, so the quick profile never sees its parts) is recorded ``killed: false``; its re-send is
still 100%, since nothing it sent would have survived the kill.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import data
from bench.context import STAGERD_ROOT, BenchContext, stagerd_has
from bench.data import Archive
from bench.measure import Poller, Sample, kill_session
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command, Uploader, uploaders
from bench.scenarios.common import last_json, run_command, with_extra

NAME = "resume"
KILL_AT = 0.5
# --quick keeps its seconds: the peers it has always run (each is a kill plus a full rerun).
QUICK_PEERS = ("s5cmd cp", "rclone copyto", "boto3 upload_file")


def run(ctx: BenchContext) -> ScenarioResult:
    sizes = ctx.sizes
    archive = data.wav_archive(ctx.data_dir, sizes.resume_archive, sizes.member)
    result = ScenarioResult(
        NAME,
        "Resume after SIGKILL at 50% of an upload: bytes re-sent",
        {"archive_bytes": archive.size, "kill_at": KILL_AT},
        nbytes=archive.size,
    )
    contenders = []
    missing = stagerd_has("commands.transfer")
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
    else:
        make = _stagerd_cmd(ctx, archive)
        contenders.append(Contender("stagerd", _runner(ctx, archive, make, stagerd=True), True))
    for peer, (build, role) in uploaders().items():
        if ctx.quick and peer not in QUICK_PEERS:
            continue  # the upload scenario already runs these commands in --quick
        # One round each: a peer re-sends the whole file by design, the round only shows it.
        runner = _runner(ctx, archive, _peer_cmd(ctx, archive, build))
        contenders.append(Contender(peer, runner, max_rounds=1, role=role))
    result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios("resent_fraction")
    if not missing and result.contenders[0].ok:
        resent = result.contenders[0].median("resent_fraction")
        result.checks.append(Check("stagerd bytes re-sent / file size", resent, "<=", 0.55))
        result.add_rss_check()
    return result


CommandFor = Callable[[str, str], Command]  # (bucket, batch_id) -> command


def _stagerd_cmd(ctx: BenchContext, archive: Archive) -> CommandFor:
    def build(bucket: str, batch: str) -> Command:
        scratch = ctx.work / "runs" / "resume-scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        argv = ctx.stagerd("transfer", "upload", str(archive.path), "--batch-id", batch)
        argv.append("--no-enqueue")
        if ctx.quick:  # several parts in flight even on a small file
            argv += ["--part-size", f"{ctx.sizes.resume_part}", "--concurrency", "2"]
        return Command(argv, ctx.stagerd_env(bucket, scratch))

    return build


def _peer_cmd(ctx: BenchContext, archive: Archive, build: Uploader) -> CommandFor:
    def make(bucket: str, batch: str) -> Command:
        return build(ctx, archive.path, bucket, f"archives/{batch}.tar")

    return make


def _runner(
    ctx: BenchContext, archive: Archive, make: CommandFor, *, stagerd: bool = False
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        batch = f"bench-rs-{uuid.uuid4().hex[:8]}"
        key = f"archives/{batch}.tar"
        with ctx.bucket("rs") as bucket:
            cmd = make(bucket, batch)
            killed = kill_midway(ctx, cmd, bucket, key, archive.size)
            if stagerd and not killed["killed"]:
                raise RunFailed(f"stagerd finished before {KILL_AT:.0%} could be observed")
            sample, out = run_command(cmd, server=ctx.server_pids)
            client = ctx.s3_client()
            if client.head_object(Bucket=bucket, Key=key)["ContentLength"] != archive.size:
                raise RunFailed("rerun left an object of the wrong size")
            pending = {
                u["UploadId"]
                for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            }
        orphaned = bool(killed["upload_ids"]) and set(killed["upload_ids"]) <= pending
        if stagerd:
            report = last_json(out)
            resent = report["uploaded_bytes"] / archive.size
            extra = {
                "uploaded_bytes": report["uploaded_bytes"],
                "resumed_bytes": report.get("resumed_bytes"),
            }
        else:
            resent, extra = 1.0, {}  # no cross-process resume: the rerun starts from zero
        return with_extra(
            sample,
            resent_fraction=resent,
            killed_at=killed["fraction"],
            killed=killed["killed"],
            killed_upload_orphaned=orphaned,
            killed_run_peak_rss=killed["peak_rss"],
            **extra,
        )

    return once


def completed_bytes(client: Any, bucket: str, key: str) -> tuple[int, list[str]]:
    """Bytes in completed parts of every pending multipart upload of *key*, and their ids."""
    total, ids = 0, []
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []):
        ids.append(upload["UploadId"])
        pages = client.get_paginator("list_parts").paginate(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"]
        )
        total += sum(p["Size"] for page in pages for p in page.get("Parts", []))
    return total, ids


def kill_midway(
    ctx: BenchContext, cmd: Command, bucket: str, key: str, size: int
) -> dict[str, Any]:
    """Start *cmd*, SIGKILL its process group once S3 holds KILL_AT of the file."""
    client = ctx.s3_client()
    proc = subprocess.Popen(
        cmd.argv,
        env=cmd.env,
        cwd=STAGERD_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    done, ids, killed = 0, [], False
    deadline = time.monotonic() + 1800
    with Poller([proc.pid]) as poller:
        while proc.poll() is None and time.monotonic() < deadline:
            done, ids = completed_bytes(client, bucket, key)
            if done >= KILL_AT * size:
                kill_session(proc)
                killed = True
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    return {
        "killed": killed,
        "fraction": done / size,
        "upload_ids": ids,
        "peak_rss": poller.peak_total_rss,
    }
