"""A real sample processor: read every WAV header of a batch, write one JSON line per file.

Oneshot (what ``STAGERD_PROCESSOR="python -m stagerd.samples.wavinfo"`` runs per batch):
reads ``$STAGERD_INPUT_DIR`` recursively, writes ``$STAGERD_RESULTS`` (JSONL, one object
per ``*.wav`` with ``item`` = its path relative to the input dir, ``duration``,
``sample_rate``, ``channels``, ``sample_width``, ``frames``, ``bytes``; an unreadable file
gets ``error`` instead) and the trailer ``{"stagerd": "end", "count": N}``, exits 0.

``--persistent``: started once; reads one JSON request per line on stdin
(``{"batch_id", "input_dir", "results", "batch_dir"}``) and answers one JSON line per
request on stdout (``{"batch_id", "ok", "error"?}``); exits at EOF.

Test knobs: ``--sleep S`` (per batch), ``--fail`` (oneshot exits 1; persistent answers
``ok: false``), ``--die-if-exists PATH`` (persistent: if PATH exists when a request
arrives, remove it and exit 3 without answering, simulating a crash once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO


def wav_info(path: Path, root: Path) -> dict[str, Any]:
    """The result object for one file (``error`` when its header cannot be read)."""
    item = path.relative_to(root).as_posix()
    result: dict[str, Any] = {"item": item, "bytes": path.stat().st_size}
    try:
        with wave.open(str(path), "rb") as wav:
            rate, frames = wav.getframerate(), wav.getnframes()
            result.update(
                sample_rate=rate,
                channels=wav.getnchannels(),
                sample_width=wav.getsampwidth(),
                frames=frames,
                duration=round(frames / rate, 6) if rate else 0.0,
            )
    except (wave.Error, EOFError, ValueError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def process_dir(input_dir: Path, results: Path) -> int:
    """Write one JSON line per WAV under *input_dir* to *results*; return how many."""
    paths = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")
    with results.open("w", encoding="utf-8") as out:
        for path in paths:
            out.write(json.dumps(wav_info(path, input_dir), sort_keys=True) + "\n")
        # The trailer: the file is complete, and a batch without WAVs really has no results.
        out.write(json.dumps({"stagerd": "end", "count": len(paths)}) + "\n")
    return len(paths)


def run_oneshot(args: argparse.Namespace) -> int:
    try:
        batch_id = os.environ["STAGERD_BATCH_ID"]
        input_dir = Path(os.environ["STAGERD_INPUT_DIR"])
        results = Path(os.environ["STAGERD_RESULTS"])
    except KeyError as exc:
        print(f"wavinfo: {exc.args[0]} is not set", file=sys.stderr)
        return 2
    time.sleep(args.sleep)
    if args.fail:
        print(f"wavinfo: batch {batch_id}: failing as asked (--fail)", file=sys.stderr)
        return 1
    count = process_dir(input_dir, results)
    print(f"wavinfo: batch {batch_id}: {count} files")
    return 0


def answer(request: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Handle one persistent-mode request; never raises for a bad request."""
    if not isinstance(request, dict) or not isinstance(request.get("batch_id"), str):
        return {"batch_id": None, "ok": False, "error": "request lacks a string batch_id"}
    batch_id = request["batch_id"]
    time.sleep(args.sleep)
    if args.fail:
        return {"batch_id": batch_id, "ok": False, "error": "failing as asked (--fail)"}
    try:
        count = process_dir(Path(request["input_dir"]), Path(request["results"]))
    except (KeyError, TypeError, OSError) as exc:
        return {"batch_id": batch_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(f"wavinfo: batch {batch_id}: {count} files", file=sys.stderr, flush=True)
    return {"batch_id": batch_id, "ok": True}


def run_persistent(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    print("wavinfo: persistent processor ready", file=sys.stderr, flush=True)
    for line in stdin:
        if not line.strip():
            continue
        if args.die_if_exists is not None and args.die_if_exists.exists():
            args.die_if_exists.unlink()
            print("wavinfo: dying as asked (--die-if-exists)", file=sys.stderr, flush=True)
            return 3
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        stdout.write(json.dumps(answer(request, args)) + "\n")
        stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagerd.samples.wavinfo")
    parser.add_argument("--persistent", action="store_true", help="serve requests on stdin")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per batch")
    parser.add_argument("--fail", action="store_true", help="fail every batch")
    parser.add_argument("--die-if-exists", type=Path, help="persistent: crash once if PATH exists")
    args = parser.parse_args(argv)
    if args.persistent:
        return run_persistent(args, sys.stdin, sys.stdout)
    return run_oneshot(args)


if __name__ == "__main__":
    sys.exit(main())
