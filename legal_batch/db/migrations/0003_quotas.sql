-- 0003: provider queue quotas and the submit gate.
-- One row per (provider, model, kind): the queue quota the provider enforces — enqueued input tokens
-- across unfinished batches (OpenAI, Azure OpenAI) or jobs in progress (Bedrock) — as configured or
-- as learned from the provider's refusals. Shared by every process that submits.
CREATE TABLE IF NOT EXISTS provider_quotas (
    provider        text NOT NULL,
    model           text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('enqueued_tokens', 'jobs')),
    limit_value     bigint CHECK (limit_value IS NULL OR limit_value > 0),
    source          text NOT NULL CHECK (source IN ('configured', 'stated', 'learned')),
    refusals        integer NOT NULL DEFAULT 0,
    last_refusal    text,
    last_refusal_at timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model, kind)
);

-- Why a shard is not submitted yet (quota full, budget reached, back-off) and since when.
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS waiting_reason text;
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS waiting_since timestamptz;
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS quota_refusals integer NOT NULL DEFAULT 0;
-- A shard too big for the quota is split into smaller shards; the original keeps state 'split'.
ALTER TABLE batch_jobs ADD COLUMN IF NOT EXISTS split_into text[];
ALTER TABLE batch_jobs DROP CONSTRAINT IF EXISTS batch_jobs_state;
ALTER TABLE batch_jobs ADD CONSTRAINT batch_jobs_state CHECK (state IN (
    'planned', 'exported', 'submitting', 'pending', 'running', 'completed', 'partial',
    'failed', 'cancelled', 'expired', 'ingested', 'split'));
CREATE INDEX IF NOT EXISTS batch_jobs_provider_model_state ON batch_jobs (provider, model, state);
