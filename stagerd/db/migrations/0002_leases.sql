-- Issue 17: fencing tokens and immutable batch ids.
--
-- lease: the newest lease token (a Redis epoch, bumped past this value when Redis forgot
-- its counter) that claimed the batch. A commit or state change carrying an older token is
-- refused inside the transaction, so a stalled worker's late write can never land.
-- archive_size: the size of the archive the batch id holds (with sha256), recorded at the
-- first pickup and kept across a Redis loss; `transfer upload` and the worker compare a new
-- archive against it.

ALTER TABLE stagerd_batches ADD COLUMN IF NOT EXISTS lease bigint;
ALTER TABLE stagerd_batches ADD COLUMN IF NOT EXISTS archive_size bigint;
