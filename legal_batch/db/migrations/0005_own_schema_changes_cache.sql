-- 0005: our tables in a schema of our own; change detection; the vector cache.
-- Runs with our schema (LEGAL_BATCH_SCHEMA, `legal_batch` by default) first on the search path:
-- current_schema() is ours, and unqualified names below are created there.

-- A database migrated before 0005 has our tables in `public`: move them into our schema (indexes,
-- sequences and constraints go with them). court_cases and case_embeddings move only when they are
-- ours (all of 0001's columns; a foreign key to our case_chunks), else ours are created here;
-- headnote_corpus, an input that may be a user's own, stays where it is.
DO $$
DECLARE
    ours text := current_schema();
    moved text;
BEGIN
    IF ours <> 'public' THEN
        FOREACH moved IN ARRAY ARRAY['schema_migrations', 'batch_jobs', 'batch_items', 'case_chunks',
                                      'provider_quotas', 'template_runs', 'template_files', 'template_rows',
                                      'template_results'] LOOP
            IF to_regclass(format('public.%I', moved)) IS NOT NULL
               AND to_regclass(format('%I.%I', ours, moved)) IS NULL THEN
                EXECUTE format('ALTER TABLE public.%I SET SCHEMA %I', moved, ours);
            END IF;
        END LOOP;
        IF to_regclass('public.court_cases') IS NOT NULL AND to_regclass(format('%I.court_cases', ours)) IS NULL
           AND (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('public.court_cases')
                  AND NOT attisdropped AND attname IN ('id', 'neutral_citation', 'case_name', 'court',
                      'decision_date', 'full_text', 'headnote', 'headnote_model', 'headnote_generated_at',
                      'updated_at')) = 10 THEN
            EXECUTE format('ALTER TABLE public.court_cases SET SCHEMA %I', ours);
        END IF;
        IF to_regclass('public.case_embeddings') IS NOT NULL
           AND to_regclass(format('%I.case_embeddings', ours)) IS NULL
           AND EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = to_regclass('public.case_embeddings') AND contype = 'f'
                         AND confrelid = to_regclass(format('%I.case_chunks', ours))) THEN
            EXECUTE format('ALTER TABLE public.case_embeddings SET SCHEMA %I', ours);
        END IF;
    END IF;
    IF to_regclass('headnote_corpus') IS NULL THEN
        CREATE TABLE headnote_corpus (
            id            bigserial PRIMARY KEY,
            headnote_text text NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        );
    END IF;
END $$;

-- The built-in source, when court_cases in public was not ours.
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
-- The default vector table, when case_embeddings in public was not ours.
CREATE TABLE IF NOT EXISTS case_embeddings (
    case_id     uuid    NOT NULL,
    chunk_index integer NOT NULL,
    model       text    NOT NULL,
    embedding   vector(1024) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (case_id, chunk_index, model),
    FOREIGN KEY (case_id, chunk_index) REFERENCES case_chunks(case_id, chunk_index) ON DELETE CASCADE
);

-- Chunks belong to whichever table is the source (LEGAL_BATCH_SOURCE_TABLE): no foreign key to
-- court_cases. A deleted case's chunks and vectors are removed by the next chunking.
ALTER TABLE case_chunks DROP CONSTRAINT IF EXISTS case_chunks_case_id_fkey;
CREATE INDEX IF NOT EXISTS case_chunks_text_sha256 ON case_chunks (text_sha256);

-- The hash of the chunk text a vector was made from: `legal-batch verify` reports vectors whose
-- text no longer matches the source. NULL for vectors written before 0005.
ALTER TABLE case_embeddings ADD COLUMN IF NOT EXISTS text_sha256 text;

-- One row per case chunked: the hash of the text (and headnote) it was chunked from. A case whose
-- hash differs from its text's is re-chunked; one without a row (chunked before 0005) is compared
-- chunk by chunk once.
CREATE TABLE IF NOT EXISTS chunked_cases (
    case_id         uuid PRIMARY KEY,
    text_sha256     text NOT NULL,          -- sha256 of full_text (UTF-8; '' when NULL)
    headnote_sha256 text,                   -- sha256 of the headnote chunked, NULL: none
    chunks          integer NOT NULL,       -- 0: the text could not be chunked (its item says why)
    chunked_at      timestamptz NOT NULL DEFAULT now()
);

-- The vector cache: the same text is never paid for twice. Keyed by what decides the vector:
-- provider, model, dimensions and the sha256 of the exact text sent. Filled at ingest, read before
-- planning; kept by `legal-batch reset` unless --cache.
CREATE TABLE IF NOT EXISTS vector_cache (
    provider    text    NOT NULL,
    model       text    NOT NULL,
    dimensions  integer NOT NULL,
    text_sha256 text    NOT NULL,
    embedding   vector  NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model, dimensions, text_sha256)
);

-- What the cache saved: one row per batch of chunks served from it instead of a request.
CREATE TABLE IF NOT EXISTS cache_savings (
    id         bigserial PRIMARY KEY,
    flow       text    NOT NULL,
    provider   text    NOT NULL,
    model      text    NOT NULL,
    requests   integer NOT NULL,
    tokens     bigint  NOT NULL,
    saved_usd  numeric(14, 6) NOT NULL,
    served_at  timestamptz NOT NULL DEFAULT now()
);

-- Headnotes the headnotes flow wrote, whatever table holds them: model, when, and the hash of the
-- judgment text they were written from. `stale_since`: the text changed after (regenerated only
-- with LEGAL_BATCH_HEADNOTE_REGENERATE_STALE).
CREATE TABLE IF NOT EXISTS case_headnotes (
    case_id      uuid PRIMARY KEY,
    model        text NOT NULL,
    generated_at timestamptz NOT NULL,
    text_sha256  text,                      -- NULL: written before 0005
    stale_since  timestamptz
);

-- Headnotes generated before 0005 were recorded on court_cases itself.
DO $$
BEGIN
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('court_cases') AND NOT attisdropped
          AND attname IN ('headnote_model', 'headnote_generated_at')) = 2 THEN
        INSERT INTO case_headnotes (case_id, model, generated_at)
        SELECT id, headnote_model, headnote_generated_at FROM court_cases
        WHERE headnote IS NOT NULL AND headnote_model IS NOT NULL AND headnote_generated_at IS NOT NULL
        ON CONFLICT (case_id) DO NOTHING;
    END IF;
END $$;
