"""The shipped samples: the makebatch generator and the wavinfo processor, as real processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from stagerd.samples.makebatch import make_batch
from stagerd.samples.wavinfo import process_dir
from tests.conftest import base_env


def run_module(module: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=60, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def test_makebatch_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_batch(tmp_path / "a.tar", 5, seed=3)
    b = make_batch(tmp_path / "b.tar", 5, seed=3)
    c = make_batch(tmp_path / "c.tar", 5, seed=4)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    with tarfile.open(a.path) as tar:
        names = [m.name for m in tar.getmembers()]
        assert all(m.isreg() and m.size == 32044 for m in tar.getmembers())
    assert names == [f"{i:06d}.wav" for i in range(1, 6)]


def test_makebatch_cli_prints_the_payload_fields(tmp_path: Path) -> None:
    out = tmp_path / "big.tar"
    proc = run_module(
        "stagerd.samples.makebatch", str(out), "--files", "3", "--file-bytes", "1MiB",
        "--rate", "48000", "--channels", "2", env=base_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info == {
        "path": str(out),
        "files": 3,
        "size": out.stat().st_size,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    bad = run_module("stagerd.samples.makebatch", str(out), "--files", "1", "--file-bytes", "lots",
                     env=base_env())  # fmt: skip
    assert bad.returncode == 2 and "not a size" in bad.stderr


def extract(tmp_path: Path, files: int = 2) -> Path:
    info = make_batch(tmp_path / "x.tar", files, seed=1, file_bytes=16044, rate=8000)
    input_dir = tmp_path / "input"
    with tarfile.open(info.path) as tar:
        tar.extractall(input_dir)
    return input_dir


def test_wavinfo_reads_headers_and_flags_broken_files(tmp_path: Path) -> None:
    input_dir = extract(tmp_path)
    (input_dir / "sub").mkdir()
    (input_dir / "sub" / "broken.WAV").write_bytes(b"RIFF....not a wav")
    (input_dir / "notes.txt").write_text("ignored")
    results = tmp_path / "results.jsonl"
    assert process_dir(input_dir, results) == 3
    *rows, trailer = [json.loads(line) for line in results.read_text().splitlines()]
    assert trailer == {"stagerd": "end", "count": 3}
    assert [r["item"] for r in rows] == ["000001.wav", "000002.wav", "sub/broken.WAV"]
    assert rows[0] == {
        "item": "000001.wav", "bytes": 16044, "channels": 1, "duration": 1.0, "frames": 8000,
        "sample_rate": 8000, "sample_width": 2,
    }  # fmt: skip
    assert "error" in rows[2] and rows[2]["bytes"] == 17


def test_wavinfo_oneshot_cli(tmp_path: Path) -> None:
    input_dir = extract(tmp_path)
    results = tmp_path / "r.jsonl"
    env = {
        **base_env(),
        "STAGERD_BATCH_ID": "b9",
        "STAGERD_INPUT_DIR": str(input_dir),
        "STAGERD_RESULTS": str(results),
    }
    proc = run_module("stagerd.samples.wavinfo", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "batch b9: 2 files" in proc.stdout
    assert len(results.read_text().splitlines()) == 2 + 1  # and the trailer
    failed = run_module("stagerd.samples.wavinfo", "--fail", env=env)
    assert failed.returncode == 1 and "failing as asked" in failed.stderr
    unset = run_module("stagerd.samples.wavinfo", env=base_env())
    assert unset.returncode == 2 and "STAGERD_BATCH_ID is not set" in unset.stderr


def test_wavinfo_persistent_protocol(tmp_path: Path) -> None:
    input_dir = extract(tmp_path)
    requests = [
        {"batch_id": "p1", "input_dir": str(input_dir), "results": str(tmp_path / "1.jsonl"),
         "batch_dir": str(tmp_path)},
        "not json",
        {"batch_id": "p2", "input_dir": str(tmp_path / "missing"),
         "results": str(tmp_path / "nodir" / "2.jsonl"), "batch_dir": str(tmp_path)},
    ]  # fmt: skip
    stdin = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests) + "\n"
    proc = run_module("stagerd.samples.wavinfo", "--persistent", env=base_env(), input=stdin)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert answers[0] == {"batch_id": "p1", "ok": True}
    assert answers[1]["ok"] is False and answers[1]["batch_id"] is None
    assert answers[2]["batch_id"] == "p2" and answers[2]["ok"] is False and answers[2]["error"]
    assert len((tmp_path / "1.jsonl").read_text().splitlines()) == 2 + 1  # and the trailer
