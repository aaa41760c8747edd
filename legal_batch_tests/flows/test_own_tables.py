"""Your own tables: cases read from a table of yours with mapped columns, vectors written to a table
of your choosing with the model's dimension, everything of ours in our own schema (so a table of
yours named like ours is never touched), and a database migrated before that layout keeps working.
A table or column that cannot be used is one line naming it and what to set, before anything is
written."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from legal_batch.core import ledger
from legal_batch.core.demo_corpus import generate_cases
from legal_batch.db import connect, upgrade
from legal_batch.db.migrate import migration_files
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.settings import get_settings
from legal_batch_tests.test_cli_errors import assert_one_line, run_main

SEEDS_TABLE = (  # the seed scripts' court_cases: no court, no date, no headnote bookkeeping
    "CREATE TABLE public.court_cases (id uuid PRIMARY KEY, neutral_citation varchar(200), case_name text,"
    " full_text text, headnote text, updated_at timestamptz NOT NULL DEFAULT now())"
)


def run(instance: dg.DagsterInstance, flow: str) -> None:
    result = FlowDriver(FLOWS_BY_NAME[flow], defs, flow=flow, echo=lambda _: None, dagster_instance=instance).run(
        wait=True, poll_interval=0)
    assert result.failed_runs == []


def scalar(conn: psycopg.Connection, sql: str, *params: object):
    return conn.execute(sql, params).fetchone()[0]


def shape(conn: psycopg.Connection, table: str) -> list[tuple]:
    """A table's columns, constraints, indexes and triggers: what altering it would change."""
    columns = conn.execute("SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute"
                           " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                           (table,)).fetchall()
    others = conn.execute("SELECT 'c', conname FROM pg_constraint WHERE conrelid = %s::regclass"
                          " UNION ALL SELECT 'i', indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass"
                          " UNION ALL SELECT 't', tgname FROM pg_trigger WHERE tgrelid = %s::regclass ORDER BY 1, 2",
                          (table, table, table)).fetchall()
    return columns + others


def seed_users_table(conn: psycopg.Connection, cases: int) -> list[uuid.UUID]:
    conn.execute(SEEDS_TABLE)
    ids = []
    for case in generate_cases(cases, seed=7):
        conn.execute("INSERT INTO public.court_cases (id, neutral_citation, case_name, full_text)"
                     " VALUES (%s, %s, %s, %s)", (case.id, case.neutral_citation, case.case_name, case.full_text))
        ids.append(case.id)
    return ids


@pytest.fixture
def users_tables(lb_env, conn, monkeypatch):
    """A user's `public.court_cases` (the seeds' schema) as the source, vectors of 512 dimensions to
    `public.case_embeddings_cohere` (not there yet)."""
    ids = seed_users_table(conn, cases=3)
    for name, value in {"SOURCE_TABLE": "court_cases", "SOURCE_CITATION_COLUMN": "neutral_citation",
                        "SOURCE_NAME_COLUMN": "case_name", "SOURCE_HEADNOTE_COLUMN": "headnote",
                        "EMBEDDINGS_TABLE": "case_embeddings_cohere", "EMBEDDING_DIMENSIONS": "512"}.items():
        monkeypatch.setenv(f"LEGAL_BATCH_{name}", value)
    get_settings(fresh=True)
    return ids


def test_cases_come_from_your_table_and_vectors_go_to_yours_with_the_models_dimension(
        users_tables, conn, dagster_instance):
    before = shape(conn, "public.court_cases")
    rows_before = conn.execute("SELECT * FROM public.court_cases ORDER BY id").fetchall()

    run(dagster_instance, "embeddings")

    chunks = scalar(conn, "SELECT count(*) FROM legal_batch.case_chunks")
    assert chunks > 3
    assert {str(c) for (c,) in conn.execute("SELECT DISTINCT case_id FROM case_chunks")} == {
        str(i) for i in users_tables}
    assert scalar(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = 'public.case_embeddings_cohere'::regclass AND attname = 'embedding'") \
        == "vector(512)"
    assert scalar(conn, "SELECT count(*) FROM public.case_embeddings_cohere WHERE vector_dims(embedding) = 512"
                        " AND text_sha256 IS NOT NULL") == chunks
    assert scalar(conn, "SELECT count(*) FROM legal_batch.case_embeddings") == 0
    assert scalar(conn, "SELECT count(*) FROM legal_batch.court_cases") == 0, "our built-in table is not the source"
    assert scalar(conn, "SELECT count(*) FROM pg_indexes WHERE tablename = 'case_embeddings_cohere'"
                        " AND indexdef LIKE '%%hnsw%%'") == 1, "a table we created is ours to index"
    # nothing of ours outside our schema but the vector table asked for
    assert {r for (r,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")} == {
        "court_cases", "case_embeddings_cohere"}
    assert shape(conn, "public.court_cases") == before
    assert conn.execute("SELECT * FROM public.court_cases ORDER BY id").fetchall() == rows_before

    run(dagster_instance, "headnotes")  # written into the mapped headnote column, bookkeeping in ours

    assert scalar(conn, "SELECT count(*) FROM public.court_cases WHERE headnote IS NOT NULL") == 3
    assert scalar(conn, "SELECT count(*) FROM case_headnotes") == 3
    assert shape(conn, "public.court_cases") == before
    run(dagster_instance, "embeddings")
    assert scalar(conn, "SELECT count(*) FROM public.case_embeddings_cohere e JOIN case_chunks c"
                        " USING (case_id, chunk_index) WHERE c.chunk_type = 'headnote'") >= 3


def test_search_and_verify_read_your_tables(users_tables, conn, dagster_instance, capsys, monkeypatch):
    run(dagster_instance, "embeddings")
    home = Path(get_settings().home_dir) / "dagster-cli"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    code, out, err = run_main(capsys, monkeypatch, "search", "trafficking in a dangerous drug", "--k", "2")
    assert code == 0, err
    names = {name for (name,) in conn.execute("SELECT case_name FROM public.court_cases")}
    assert any(name in out for name in names), out

    conn.execute("UPDATE public.court_cases SET full_text = full_text || ' Corrigendum.' WHERE id = %s",
                 (users_tables[0],))
    code, out, err = run_main(capsys, monkeypatch, "verify", "--flow", "embeddings")
    assert code == 0, err
    assert "sink rows no longer match the source text" in out and str(users_tables[0]) in out


def test_other_dimensions_work_in_our_own_table_while_it_is_empty(lb_env, conn, dagster_instance, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_EMBEDDING_DIMENSIONS", "256")
    get_settings(fresh=True)
    from legal_batch.core.seed import seed_demo_cases

    seed_demo_cases(conn, cases=2)
    run(dagster_instance, "embeddings")
    assert scalar(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = 'case_embeddings'::regclass AND attname = 'embedding'") == "vector(256)"
    assert scalar(conn, "SELECT count(*) FROM case_embeddings WHERE vector_dims(embedding) = 256") == \
        scalar(conn, "SELECT count(*) FROM case_chunks")
    job = ledger.list_jobs(conn, flow="embeddings")[0]
    check = dagster_instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("case_embeddings"), "vectors_finite_unit_norm")])
    assert list(check.values())[0].status.value == "SUCCEEDED" and job.params["dimensions"] == 256


def test_halfvec_storage_stores_indexes_and_searches_float16_vectors(lb_env, conn, dagster_instance, monkeypatch):
    import numpy as np

    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.flows.embeddings.search import search
    from legal_batch.providers.base import EmbeddingRequest
    from legal_batch.providers.local import LocalProvider

    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_STORAGE", "halfvec")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=3)
    run(dagster_instance, "embeddings")

    assert scalar(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = 'case_embeddings'::regclass AND attname = 'embedding'") == "halfvec(1024)"
    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert scalar(conn, "SELECT count(*) FROM case_embeddings WHERE vector_dims(embedding) = 1024"
                        " AND text_sha256 IS NOT NULL") == chunks
    assert "halfvec_cosine_ops" in scalar(conn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'case_embeddings_hnsw'")
    check = dagster_instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("case_embeddings"), "vectors_finite_unit_norm")])
    assert list(check.values())[0].status.value == "SUCCEEDED"

    # the stored components are the provider's float32 vector rounded to float16, as ::halfvec rounds it
    case_id, index, text = conn.execute("SELECT case_id, chunk_index, chunk_text FROM case_chunks"
                                        " WHERE chunk_type <> 'headnote' ORDER BY case_id, chunk_index"
                                        " OFFSET 5 LIMIT 1").fetchone()
    provider = LocalProvider(lb_env.home_dir / "local_provider", dimensions=1024)
    model = provider.default_model("embeddings")
    vector = next(iter(provider.realtime([EmbeddingRequest("q", text)], endpoint="embeddings", model=model))).vector
    stored = np.array(scalar(conn, "SELECT embedding::real[] FROM case_embeddings WHERE case_id = %s"
                                   " AND chunk_index = %s", case_id, index), dtype=np.float32)
    assert (stored == vector.astype(np.float16).astype(np.float32)).all()
    assert (stored == np.array(scalar(conn, "SELECT %s::vector::halfvec::real[]", vector), dtype=np.float32)).all()

    conn.execute("SET enable_seqscan = off")  # the index serves the search (the table is tiny)
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT case_id FROM embedding_sink e ORDER BY e.embedding <=> %s::halfvec(1024) LIMIT 5", (vector,)))
    assert "case_embeddings_hnsw" in plan, plan
    hits = search(conn, vector, model=model, k=3)
    assert hits[0].chunk_index == index and hits[0].chunk_text == text and hits[0].score > 0.999


# -- bad input: one line naming the table, the column and what to set; nothing written --------------

@pytest.fixture
def cli_env(lb_env, monkeypatch):
    home = Path(lb_env.home_dir) / "dagster-cli"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return lb_env


def nothing_written(conn: psycopg.Connection) -> None:
    for table in ("batch_jobs", "batch_items", "case_chunks", "chunked_cases"):
        assert scalar(conn, f"SELECT count(*) FROM legal_batch.{table}") == 0, table


@pytest.mark.parametrize(("setup", "variables", "expected"), [
    ("CREATE TABLE public.my_cases (case_uuid uuid PRIMARY KEY, body text)",
     {"SOURCE_ID_COLUMN": "case_uuid", "SOURCE_TEXT_COLUMN": "judgment"},
     ["LEGAL_BATCH_SOURCE_TEXT_COLUMN=judgment", "public.my_cases has no column judgment", "case_uuid, body"]),
    ("CREATE TABLE public.my_cases (id uuid PRIMARY KEY, body text, pages integer)",
     {"SOURCE_TEXT_COLUMN": "body", "SOURCE_COURT_COLUMN": "pages"},
     ["LEGAL_BATCH_SOURCE_COURT_COLUMN=pages", "public.my_cases.pages is integer, not text"]),
    ("CREATE TABLE public.my_cases (id uuid PRIMARY KEY, full_text bytea)", {},
     ["LEGAL_BATCH_SOURCE_TEXT_COLUMN=full_text", "public.my_cases.full_text is bytea, not text"]),
    ("CREATE TABLE public.my_cases (id uuid, full_text text);"
     " INSERT INTO public.my_cases VALUES ('00000000-0000-0000-0000-000000000001', 'a'),"
     " ('00000000-0000-0000-0000-000000000001', 'b')", {},
     ["LEGAL_BATCH_SOURCE_ID_COLUMN=id", "public.my_cases.id is not unique", "2 rows have id 00000000-"]),
    ("CREATE TABLE public.my_cases (id bigint PRIMARY KEY, full_text text)", {},
     ["LEGAL_BATCH_SOURCE_ID_COLUMN=id", "public.my_cases.id is bigint, not uuid", "md5(id::text)::uuid"]),
    ("CREATE TABLE public.other (id uuid)", {},
     ["LEGAL_BATCH_SOURCE_TABLE=my_cases", "no table or view public.my_cases"]),
    ("CREATE TABLE public.my_cases (id uuid PRIMARY KEY, full_text text);"
     " CREATE TABLE public.vecs (case_id uuid, chunk_index integer, model text, embedding vector(768),"
     " text_sha256 text, PRIMARY KEY (case_id, chunk_index, model))",
     {"EMBEDDINGS_TABLE": "vecs"},
     ["LEGAL_BATCH_EMBEDDING_DIMENSIONS=1024", "public.vecs.embedding holds vectors of 768 dimensions",
      "LEGAL_BATCH_EMBEDDING_DIMENSIONS=768", "LEGAL_BATCH_EMBEDDINGS_TABLE"]),
    ("CREATE TABLE public.my_cases (id uuid PRIMARY KEY, full_text text);"
     " CREATE TABLE public.vecs (case_id uuid, chunk_index integer, model text, embedding vector(1024))",
     {"EMBEDDINGS_TABLE": "vecs"},
     ["LEGAL_BATCH_EMBEDDINGS_TABLE=vecs", "public.vecs has no column text_sha256"]),
])
def test_a_table_or_column_that_cannot_be_used_is_one_line_and_nothing_is_written(
        cli_env, conn, capsys, monkeypatch, setup, variables, expected):
    conn.execute(setup)
    variables = {"SOURCE_TABLE": "my_cases", **variables}
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "export",
                            **{f"LEGAL_BATCH_{name}": value for name, value in variables.items()})
    assert_one_line(code, err, *expected)
    nothing_written(conn)


@pytest.mark.parametrize(("model", "dims", "expected"), [
    ("text-embedding-3-small", "2048", "text-embedding-3-small makes at most 1,536 dimensions"),
    ("amazon.titan-embed-text-v2:0", "768", "amazon.titan-embed-text-v2:0 makes vectors of 256, 512, 1024"),
])
def test_a_dimension_the_model_cannot_make_is_one_line(cli_env, conn, capsys, monkeypatch, model, dims, expected):
    code, _, err = run_main(capsys, monkeypatch, "jobs", LEGAL_BATCH_EMBEDDING_MODEL=model,
                            LEGAL_BATCH_EMBEDDING_DIMENSIONS=dims)
    assert_one_line(code, err, f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={dims}", expected)


def test_our_own_table_of_another_dimension_says_how_to_reset_it(cli_env, conn, capsys, monkeypatch):
    conn.execute("INSERT INTO court_cases (id, full_text) VALUES (%s, 'x')", (uuid.uuid4(),))
    conn.execute("INSERT INTO case_chunks VALUES ((SELECT id FROM court_cases), 0, 'body', 'x', 0, 1, 1, 'h')")
    conn.execute("INSERT INTO case_embeddings (case_id, chunk_index, model, embedding) SELECT id, 0, 'm',"
                 " array_fill(0.1, ARRAY[1024])::vector FROM court_cases")
    code, _, err = run_main(capsys, monkeypatch, "jobs", LEGAL_BATCH_EMBEDDING_DIMENSIONS="512")
    assert_one_line(code, err, "LEGAL_BATCH_EMBEDDING_DIMENSIONS=512", "case_embeddings.embedding holds vectors of "
                    "1024 dimensions", "legal-batch reset --flow embeddings")


def test_our_own_table_holding_the_other_storage_type_is_one_line(cli_env, conn, capsys, monkeypatch):
    conn.execute("INSERT INTO court_cases (id, full_text) VALUES (%s, 'x')", (uuid.uuid4(),))
    conn.execute("INSERT INTO case_chunks VALUES ((SELECT id FROM court_cases), 0, 'body', 'x', 0, 1, 1, 'h')")
    conn.execute("INSERT INTO case_embeddings (case_id, chunk_index, model, embedding) SELECT id, 0, 'm',"
                 " array_fill(0.1, ARRAY[1024])::vector FROM court_cases")
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "export", LEGAL_BATCH_EMBEDDINGS_STORAGE="halfvec")
    assert_one_line(code, err, "LEGAL_BATCH_EMBEDDINGS_STORAGE=halfvec", "case_embeddings.embedding is vector(1024), "
                    "not halfvec", "LEGAL_BATCH_EMBEDDINGS_STORAGE=vector", "legal-batch reset --flow embeddings")
    assert scalar(conn, "SELECT count(*) FROM batch_jobs") == 0
    assert scalar(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = 'case_embeddings'::regclass AND attname = 'embedding'") == "vector(1024)"


def test_your_table_of_the_other_storage_type_is_one_line_even_when_empty(cli_env, conn, capsys, monkeypatch):
    conn.execute("CREATE TABLE public.vecs (case_id uuid, chunk_index integer, model text, embedding halfvec(1024),"
                 " text_sha256 text, PRIMARY KEY (case_id, chunk_index, model))")
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "export", LEGAL_BATCH_EMBEDDINGS_TABLE="vecs")
    assert_one_line(code, err, "LEGAL_BATCH_EMBEDDINGS_STORAGE=vector", "public.vecs.embedding is halfvec(1024), not "
                    "vector", "LEGAL_BATCH_EMBEDDINGS_STORAGE=halfvec")
    nothing_written(conn)
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "export", LEGAL_BATCH_EMBEDDINGS_STORAGE="float8")
    assert_one_line(code, err, "LEGAL_BATCH_EMBEDDINGS_STORAGE='float8' is not valid", "'vector' or 'halfvec'")
    monkeypatch.delenv("LEGAL_BATCH_EMBEDDINGS_STORAGE")


# -- our schema ---------------------------------------------------------------------------------------

def test_a_database_migrated_before_our_schema_keeps_its_data(pg_admin_url, tmp_path):
    """Migrations 0001–0004 applied the old way (everything in public), with work in it; upgrading
    moves our tables into our schema and the data is all there, found by the same queries."""
    name = f"lb_test_legacy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = pg_admin_url.partition("?")
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        with psycopg.connect(url, autocommit=True) as old:
            old.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL"
                        " DEFAULT now())")
            for version, sql in migration_files():
                if version < "0005":
                    old.execute(sql)
                    old.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            case_id = uuid.uuid4()
            old.execute("INSERT INTO court_cases (id, full_text, headnote, headnote_model, headnote_generated_at)"
                        " VALUES (%s, 'text', 'held', 'gpt-4o-mini', now())", (case_id,))
            old.execute("INSERT INTO case_chunks VALUES (%s, 0, 'body', 'text', 0, 4, 1, 'h')", (case_id,))
            old.execute("INSERT INTO case_embeddings (case_id, chunk_index, model, embedding) VALUES"
                        " (%s, 0, 'm', array_fill(0.1, ARRAY[1024])::vector)", (case_id,))
            old.execute("INSERT INTO batch_jobs (flow, provider, model, shard_key, client_token, state)"
                        " VALUES ('embeddings', 'local', 'm', 's1', 't1', 'ingested')")

        assert upgrade(url, schema="legal_batch") == ["0005_own_schema_changes_cache", "0006_sinks_sources"]
        assert upgrade(url, schema="legal_batch") == []

        with connect(url, schema="legal_batch") as conn:
            tables = dict(conn.execute("SELECT tablename, schemaname FROM pg_tables WHERE tablename IN"
                                       " ('court_cases', 'case_chunks', 'case_embeddings', 'batch_jobs',"
                                       " 'schema_migrations', 'vector_cache')").fetchall())
            assert tables == dict.fromkeys(["court_cases", "case_chunks", "case_embeddings", "batch_jobs",
                                            "schema_migrations", "vector_cache"], "legal_batch")
            assert scalar(conn, "SELECT count(*) FROM case_embeddings") == 1
            assert scalar(conn, "SELECT shard_key FROM batch_jobs") == "s1"
            assert scalar(conn, "SELECT model FROM case_headnotes WHERE case_id = %s", case_id) == "gpt-4o-mini"
            assert scalar(conn, "SELECT count(*) FROM schema_migrations") == 6
            conn.execute("INSERT INTO batch_jobs (flow, provider, model, shard_key, client_token, state)"
                         " VALUES ('embeddings', 'local', 'm', 's2', 't2', 'planned')")  # sequences moved too
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_reset_halfvec_table_gives_its_vectors_to_the_cache_and_the_next_run_requests_none(
        lb_env, conn, dagster_instance, monkeypatch, capsys):
    """halfvec vectors go to the cache (float32) on reset and come back as halfvec, bit for bit."""
    from legal_batch.core.seed import seed_demo_cases

    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_STORAGE", "halfvec")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    run(dagster_instance, "embeddings")
    before = dict(conn.execute("SELECT text_sha256, embedding::text FROM case_embeddings").fetchall())
    requests = scalar(conn, "SELECT sum(request_count) FROM batch_jobs")

    code, _, err = run_main(capsys, monkeypatch, "reset", "--flow", "embeddings", "--yes",
                            LEGAL_BATCH_EMBEDDINGS_STORAGE="halfvec")
    assert code == 0, err
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == 0
    assert scalar(conn, "SELECT count(*) FROM vector_cache") == len(before)

    run(dagster_instance, "embeddings")
    assert scalar(conn, "SELECT count(*) FROM batch_jobs") == 0, "every vector came back from the cache"
    after = dict(conn.execute("SELECT text_sha256, embedding::text FROM case_embeddings").fetchall())
    assert after == before and requests > 0
