"""Hostile files on the transfer host through the real CLI (issue 16): the upload check
refuses what the worker would, FIFOs never hang, and the watcher never stops for one
file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_env
from tests.corpus import good_tar, hostile_archives
from tests.worker_support import wait_for

HOSTILE = {case.name: case for case in hostile_archives()}


@pytest.mark.parametrize(
    "name",
    ["pax-size-unicode-digits", "pax-size-5000-digits", "name-not-utf8", "pax-path-not-utf8",
     "symlink", "size-field-negative-base256"],
)  # fmt: skip
def test_upload_refuses_headers_the_worker_would_refuse(
    run_cli: Any, stagerd_env: dict[str, str], tmp_path: Path, redis_client: Any,
    queue_name: str, name: str,
) -> None:  # fmt: skip
    case = HOSTILE[name]
    path = tmp_path / "b.tar"
    path.write_bytes(case.data)
    result = run_cli(["transfer", "upload", str(path), "--batch-id", "h1"], env=stagerd_env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and case.reason in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert redis_client.llen(queue_name) == 0


def test_upload_of_a_fifo_is_refused_without_hanging(
    run_cli: Any, stagerd_env: dict[str, str], tmp_path: Path
) -> None:
    fifo = tmp_path / "b.tar"
    os.mkfifo(fifo)
    result = run_cli(["transfer", "upload", str(fifo), "--batch-id", "f1"], env=stagerd_env,
                     timeout=60)  # fmt: skip
    assert result.returncode == 1 and "not a regular file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_watcher_keeps_going_past_every_kind_of_bad_file(
    stagerd_env: dict[str, str], redis_client: Any, queue_name: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    long_name = "b" * 250 + ".tar"  # NAME.tar.error would be 260 bytes: ENAMETOOLONG
    (inbox / long_name).write_bytes(good_tar())
    outside = tmp_path / "outside.tar"
    outside.write_bytes(good_tar())
    (inbox / "link.tar").symlink_to(outside)
    os.mkfifo(inbox / "pipe.tar")
    (inbox / "notutf8name.tar").write_bytes(HOSTILE["name-not-utf8"].data)
    not_utf8 = os.fsdecode(b"bad-\xff.tar")  # a file name that is not UTF-8
    (inbox / not_utf8).write_bytes(good_tar())
    (inbox / "good.tar").write_bytes(good_tar())
    args = [sys.executable, "-m", "stagerd", "--log-json", "transfer", "watch", str(inbox),
            "--interval", "0.1"]  # fmt: skip
    env = {**base_env(), **stagerd_env}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        failed = inbox / "failed"
        wait_for((inbox / "done" / "good.tar").exists, 120, "good.tar done")
        wait_for((failed / long_name).exists, 120, "the long name failed")
        wait_for((failed / "notutf8name.tar").exists, 120, "the hostile tar failed")
        wait_for((failed / not_utf8).exists, 120, "the non-UTF-8 name failed")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "internal error" not in err
    errors = sorted(p.name for p in failed.iterdir() if p.name.endswith(".error"))
    assert len(errors) == 3 and all(len(os.fsencode(n)) <= 255 for n in errors), errors
    long_error = next(n for n in errors if n.startswith("bbbb"))
    text = (failed / long_error).read_text()
    assert long_name in text and "batch id" in text
    assert "not valid UTF-8" in (failed / "notutf8name.tar.error").read_text()
    assert "skipping link.tar: a symlink" in err and "skipping pipe.tar" in err
    assert err.count("skipping link.tar") == 1  # once, not every scan
    assert (inbox / "link.tar").is_symlink() and outside.exists()  # left alone
    assert redis_client.llen(queue_name) == 1
