"""Stage one batch with stagerd's library in a fresh process, so its RSS is measured alone.

``python -m bench.stage_runner BATCH_ID SHA256 [--keep-archive]``: reads stagerd's settings
from the environment, reserves scratch for the archive (size from HEAD, as the worker does),
streams + verifies + extracts it with ``stage_batch`` and prints the StageResult as JSON. The
batch dir is left in place (``release(remove=False)``) so deleting it is not timed; the
harness removes it. It ends as stagerd's own commands do (``stagerd.fastexit``), so the
one-shot row pays the same exit as ``stagerd transfer upload``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def main(argv: list[str]) -> None:
    from stagerd.config.settings import Settings
    from stagerd.gpu.stage import head_archive, stage_batch
    from stagerd.job import Job
    from stagerd.s3.boto import BotoStore
    from stagerd.scratch.space import ScratchManager

    batch_id, sha256 = argv[0], argv[1]
    keep = "--keep-archive" in argv
    settings = Settings.from_env()
    bucket = settings.require_s3().bucket
    client = BotoStore.from_settings(settings)
    job = Job.new(batch_id, sha256=sha256)
    head = head_archive(client, bucket, job.s3_key)
    job = Job.new(batch_id, size=head.size, sha256=sha256)
    manager = ScratchManager.from_settings(settings)
    reservation = manager.reserve(batch_id, head.size)
    try:
        result = stage_batch(
            client, bucket, job, reservation, keep_archive=keep, range_size=settings.range_size
        )
    finally:
        reservation.release(remove=False)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    from stagerd.fastexit import finish

    main(sys.argv[1:])
    finish(0)
