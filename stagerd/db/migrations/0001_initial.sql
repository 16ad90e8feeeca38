-- stagerd ledger: one row per batch, its results, and a history of failures.
-- Applied by `stagerd db migrate` (and at worker start) under an advisory lock.

CREATE TABLE IF NOT EXISTS stagerd_batches (
    batch_id        text PRIMARY KEY,
    s3_key          text NOT NULL,
    state           text NOT NULL CHECK (state IN
                        ('queued', 'staging', 'processing', 'done', 'failed', 'dead', 'requeued')),
    attempts        integer NOT NULL DEFAULT 0,
    worker          text,
    archive_bytes   bigint,
    extracted_bytes bigint,
    file_count      integer,
    sha256          text,
    stage_seconds   double precision,
    process_seconds double precision,
    commit_seconds  double precision,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

CREATE INDEX IF NOT EXISTS stagerd_batches_state_idx ON stagerd_batches (state, updated_at);

CREATE TABLE IF NOT EXISTS stagerd_results (
    batch_id   text NOT NULL REFERENCES stagerd_batches (batch_id),
    item       text NOT NULL,
    result     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, item)
);

-- Every failed attempt, kept even when the batch later succeeds or is retried from the
-- dead-letter list. No foreign key: poison payloads may carry no valid batch id at all.
CREATE TABLE IF NOT EXISTS stagerd_failures (
    id        bigserial PRIMARY KEY,
    batch_id  text,
    attempt   integer,
    worker    text,
    phase     text,
    outcome   text NOT NULL,
    error     text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS stagerd_failures_failed_at_idx ON stagerd_failures (failed_at DESC);
