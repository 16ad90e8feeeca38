#!/usr/bin/env bash
# The main job end to end on embedded defaults, on one machine:
#   local SeaweedFS S3 + Redis + PostgreSQL  ->  a generated batch of WAV files archived
#   -> stagerd transfer upload (S3 + enqueue) -> stagerd gpu (stage, process with the
#   sample processor, results to PostgreSQL) -> results printed -> scratch cleaned
#   -> stagerd janitor -> stagerd status.
# Everything lives under $STAGERD_DEMO_DIR (default /tmp/stagerd-demo); nothing touches
# /data or /etc. Re-runnable: each run makes a new batch id.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export STAGERD_VENV="${STAGERD_VENV:-$root/.venv}"
"$here/venv.sh"
"$here/services.sh" redis postgres seaweedfs
py="$STAGERD_VENV/bin/python"
stagerd() { "$py" -m stagerd "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

demo="${STAGERD_DEMO_DIR:-/tmp/stagerd-demo}"
mkdir -p "$demo/incoming" "$demo/scratch" "$demo/textfile"
: >"$demo/stagerd.env"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export STAGERD_ENV_FILE="$demo/stagerd.env"
export S3_ENDPOINT="${S3_ENDPOINT:-http://127.0.0.1:8333}"
export S3_ACCESS_KEY="${S3_ACCESS_KEY:-stagerd-dev}"
export S3_SECRET_KEY="${S3_SECRET_KEY:-stagerd-dev-secret}"
export S3_BUCKET="${S3_BUCKET:-stagerd-demo}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export STAGERD_QUEUE="${STAGERD_QUEUE:-demo:queue:unpack}"
export DATABASE_URL="${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/stagerd_demo}"
export STAGERD_SCRATCH_DIR="$demo/scratch"
export STAGERD_SCRATCH_BUDGET="${STAGERD_SCRATCH_BUDGET:-2GiB}"
export STAGERD_SCRATCH_HEADROOM="${STAGERD_SCRATCH_HEADROOM:-256MiB}"
export STAGERD_PROCESSOR="$py -m stagerd.samples.wavinfo"
export STAGERD_METRICS_FILE="$demo/textfile/stagerd.prom"
export STAGERD_WORKER_ID="demo-$(hostname)"
export STAGERD_HEARTBEAT_TTL=10s

step "prepare: bucket $S3_BUCKET, database stagerd_demo, schema"
"$py" - <<'PY'
import os, psycopg
from botocore.exceptions import ClientError
from stagerd.s3.client import get_s3_client
client = get_s3_client()
try:
    client.head_bucket(Bucket=os.environ["S3_BUCKET"])
except ClientError:
    client.create_bucket(Bucket=os.environ["S3_BUCKET"])
with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'stagerd_demo'").fetchone():
        conn.execute("CREATE DATABASE stagerd_demo")
PY
stagerd db migrate

batch="demo-$(date -u +%Y%m%dT%H%M%S)-$$"
archive="$demo/incoming/$batch.tar"
step "generate $archive: 12 WAV files"
"$py" -m stagerd.samples.makebatch "$archive" --files 12

step "transfer: upload to s3://$S3_BUCKET/archives/$batch.tar and enqueue"
stagerd transfer upload "$archive" --batch-id "$batch"

step "gpu worker: stage, process, record, clean up (--burst exits when the queue is empty)"
stagerd gpu --burst --concurrency 1

step "results from PostgreSQL"
stagerd db results "$batch"

step "scratch after the run (should be empty)"
leftover="$(find "$STAGERD_SCRATCH_DIR" -mindepth 1 -maxdepth 1 -not -name '.*' | wc -l)"
echo "entries left in $STAGERD_SCRATCH_DIR: $leftover"

step "janitor"
stagerd janitor --json

step "status"
stagerd status
[ "$leftover" -eq 0 ]
