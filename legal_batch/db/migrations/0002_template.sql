-- 0002: the template flow. Rows of the user's input files are staged here so the shared ledger
-- (batch_jobs/batch_items, flow 'template') can shard, submit, poll and ingest them. The original
-- row values stay in the input files: outputs are written by reading the files again and joining
-- on (file_key, row_no).

-- One row per `legal-batch template run` (or `template_inputs` materialization) over one input.
CREATE TABLE IF NOT EXISTS template_runs (
    id                bigserial PRIMARY KEY,
    name              text NOT NULL,
    fingerprint       text NOT NULL,          -- inputs, prompts, schema, output, prefix, mode, provider
    input_path        text NOT NULL,
    templates_path    text NOT NULL,
    schema_path       text NOT NULL,
    output_path       text NOT NULL,
    prompt_template   jsonb NOT NULL,         -- system_prompt, user_prompt_template, input_placeholders
    system_prompt     text NOT NULL,          -- as sent (with the schema appended where the provider needs it)
    schema_json       json NOT NULL,          -- json, not jsonb: property order is the column order
    prefix            text NOT NULL DEFAULT 'llm_',
    mode              text NOT NULL,          -- what was asked for
    execution         text,                   -- what was decided: batch or realtime
    mode_note         text,                   -- why (threshold, provider minimum, ...)
    provider          text NOT NULL,
    model             text NOT NULL,
    prefill           text NOT NULL DEFAULT '',
    max_tokens        integer NOT NULL DEFAULT 1024,
    max_field_chars   integer NOT NULL,
    record_count      integer NOT NULL DEFAULT 0,
    outputs           jsonb,                  -- output files written (paths)
    summary_path      text,
    finished_at       timestamptz,            -- every row has a result and the outputs are written
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT template_runs_mode CHECK (mode IN ('auto', 'batch', 'realtime')),
    CONSTRAINT template_runs_execution CHECK (execution IS NULL OR execution IN ('batch', 'realtime'))
);
CREATE INDEX IF NOT EXISTS template_runs_fingerprint ON template_runs (fingerprint);
CREATE INDEX IF NOT EXISTS template_runs_open ON template_runs (id) WHERE finished_at IS NULL;

-- One row per input file of a run; `file_no` is the `f<n>` in custom ids.
CREATE TABLE IF NOT EXISTS template_files (
    run_id      bigint  NOT NULL REFERENCES template_runs(id) ON DELETE CASCADE,
    file_no     integer NOT NULL,
    file_key    text    NOT NULL,             -- path relative to the input (posix), e.g. train/cases.csv
    split       text,
    format      text    NOT NULL,
    compressed  boolean NOT NULL,
    row_count   integer NOT NULL,
    size_bytes  bigint  NOT NULL,
    mtime_ns    bigint  NOT NULL,
    PRIMARY KEY (run_id, file_no),
    UNIQUE (run_id, file_key)
);

-- One row per input row: its rendered prompt (the system prompt is the run's), never its values.
CREATE TABLE IF NOT EXISTS template_rows (
    run_id           bigint  NOT NULL REFERENCES template_runs(id) ON DELETE CASCADE,
    file_key         text    NOT NULL,
    split            text,
    row_no           integer NOT NULL,        -- 1-based data row number within the file
    user_prompt      text    NOT NULL,
    truncated_fields text[]  NOT NULL DEFAULT '{}',
    est_tokens       integer NOT NULL,
    PRIMARY KEY (run_id, file_key, row_no)
);

-- One row per answered row: the raw response (parsed and validated when outputs are written) or
-- the provider's error. Re-ingest upserts.
CREATE TABLE IF NOT EXISTS template_results (
    run_id         bigint  NOT NULL,
    file_key       text    NOT NULL,
    row_no         integer NOT NULL,
    response_text  text,
    provider_error text,
    model          text    NOT NULL,
    via            text    NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, file_key, row_no),
    FOREIGN KEY (run_id, file_key, row_no) REFERENCES template_rows (run_id, file_key, row_no) ON DELETE CASCADE,
    CONSTRAINT template_results_via CHECK (via IN ('batch', 'realtime'))
);
