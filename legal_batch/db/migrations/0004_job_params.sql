-- 0004: what a shard needs after it is planned travels with its job row.
-- The per-run options its requests and results depend on (e.g. headnotes: overwrite and its cut-off,
-- few-shot count, max_tokens), stored when the shard is planned and read back when its request file
-- is written and its results are ingested, by whichever process does that. NULL: planned before
-- this migration (the settings of the process that ingests apply).
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS params jsonb;
-- Ingest runs of this shard that failed (the job-status sensor retries up to a bound, then stops
-- and says so in last_error).
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS ingest_failures integer NOT NULL DEFAULT 0;
