-- 0001: inputs (court cases, headnote corpus), chunks, embeddings and the batch ledger.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS court_cases (
    id                    uuid PRIMARY KEY,
    neutral_citation      text,
    case_name             text,
    court                 text,
    decision_date         date,
    full_text             text,
    headnote              text,
    headnote_model        text,
    headnote_generated_at timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS headnote_corpus (
    id            bigserial PRIMARY KEY,
    headnote_text text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Chunks keep their text so every embedding can be traced back to the words it encodes.
CREATE TABLE IF NOT EXISTS case_chunks (
    case_id     uuid    NOT NULL REFERENCES court_cases(id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    chunk_type  text    NOT NULL,
    chunk_text  text    NOT NULL,
    char_start  integer NOT NULL,
    char_end    integer NOT NULL,
    token_count integer NOT NULL,
    text_sha256 text    NOT NULL,
    PRIMARY KEY (case_id, chunk_index)
);

CREATE TABLE IF NOT EXISTS case_embeddings (
    case_id     uuid    NOT NULL,
    chunk_index integer NOT NULL,
    model       text    NOT NULL,
    embedding   vector(1024) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (case_id, chunk_index, model),
    FOREIGN KEY (case_id, chunk_index) REFERENCES case_chunks(case_id, chunk_index) ON DELETE CASCADE
);
-- The HNSW cosine index (case_embeddings_hnsw) is built after bulk loads, not here: maintaining it
-- row by row during a backfill is two orders of magnitude slower (see core/embeddings.py).

-- The ledger. One row per provider job (= one shard) ...
CREATE TABLE IF NOT EXISTS batch_jobs (
    id                bigserial PRIMARY KEY,
    flow              text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    mode              text NOT NULL DEFAULT 'batch' CHECK (mode IN ('batch', 'realtime')),
    shard_key         text NOT NULL UNIQUE,
    client_token      text NOT NULL UNIQUE,
    provider_job_id   text UNIQUE,
    state             text NOT NULL,
    provider_status   text,
    input_location    text,
    output_location   text,
    error_location    text,
    request_count     integer NOT NULL DEFAULT 0,
    completed_count   integer,
    failed_count      integer,
    items_done        integer,
    items_retryable   integer,
    items_failed      integer,
    input_bytes       bigint,
    est_input_tokens  bigint,
    input_tokens      bigint,
    output_tokens     bigint,
    est_cost_usd      numeric(14, 6),
    actual_cost_usd   numeric(14, 6),
    submit_attempts   integer NOT NULL DEFAULT 0,
    next_submit_at    timestamptz,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    submitted_at      timestamptz,
    finished_at       timestamptz,
    ingested_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT batch_jobs_state CHECK (state IN (
        'planned', 'exported', 'submitting', 'pending', 'running', 'completed', 'partial',
        'failed', 'cancelled', 'expired', 'ingested'))
);
CREATE INDEX IF NOT EXISTS batch_jobs_flow_state ON batch_jobs (flow, state);

-- ... and one row per request subject (a chunk, a case, a template row): its current state.
-- A subject is never in two open jobs: (flow, subject_key) is unique.
CREATE TABLE IF NOT EXISTS batch_items (
    id          bigserial PRIMARY KEY,
    flow        text NOT NULL,
    subject_key text NOT NULL,
    custom_id   text NOT NULL,
    job_id      bigint REFERENCES batch_jobs(id),
    state       text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    input_tokens integer,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (flow, subject_key),
    CONSTRAINT batch_items_state CHECK (state IN ('exported', 'submitted', 'done', 'retryable', 'failed'))
);
CREATE INDEX IF NOT EXISTS batch_items_job ON batch_items (job_id);
CREATE INDEX IF NOT EXISTS batch_items_flow_state ON batch_items (flow, state);
