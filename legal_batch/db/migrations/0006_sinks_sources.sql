-- 0006: further vector sinks and record sources.

-- What each further sink (LEGAL_BATCH_EMBEDDINGS_SINKS: chroma, weaviate) holds: one row per vector
-- written there, recorded in the transaction that follows the (idempotent) write. `target` names the
-- sink and its collection (`chroma:legal_batch-<model>-<dims>`), so a new collection is filled from
-- the start; `text_sha256` the text the vector was made from, so a chunk whose text changed is
-- written again (and a chunk that is gone is deleted there).
CREATE TABLE IF NOT EXISTS sink_vectors (
    target      text    NOT NULL,
    model       text    NOT NULL,
    case_id     uuid    NOT NULL,
    chunk_index integer NOT NULL,
    text_sha256 text,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, model, case_id, chunk_index)
);

-- Records read from a source other than files (`--source dynamodb`) into court_cases: which record a
-- case is, and the status last written back to it (for the text it had then).
CREATE TABLE IF NOT EXISTS source_records (
    case_id        uuid PRIMARY KEY,
    source         text NOT NULL,           -- e.g. dynamodb:receipt_lines
    record_id      text NOT NULL,           -- the record's key in its source
    text_sha256    text NOT NULL,           -- the text read last
    status         text,                    -- the status written back (SUCCESS, FAILED), NULL: none yet
    status_sha256  text,                    -- the text it was written for
    status_at      timestamptz,
    metadata       jsonb,                   -- the record's other scalar attributes
    read_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, record_id)
);

-- Where the last bounded scan of a source stopped (NULL: at the end; the next scan starts over).
CREATE TABLE IF NOT EXISTS source_cursors (
    source      text PRIMARY KEY,
    cursor      text,
    scanned     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
