"""`legal-batch eval`: retrieval quality of the stored embeddings on a file of queries. Thin: the work
is `flows.embeddings.evaluation`; this opens the provider and the sink, and prints the figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from legal_batch.core.errors import UserError
from legal_batch.core.wording import plural

console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)


def evaluate(
    queries: Annotated[Path, typer.Argument(
        help='JSON Lines of queries: {"query": ..., "case_ids": [...]} (or "expected_id", or "chunk_ids": '
             '["<case id>:<chunk index>"]); ids as stored or as imported.', show_default=False)],
    k: Annotated[int, typer.Option(help="Cut-off: recall@1/5/10 and @k, MRR within the top k, nDCG@k.")] = 10,
    model: Annotated[str | None, typer.Option(
        help="The embedding model (default: LEGAL_BATCH_EMBEDDING_MODEL, else the provider's).")] = None,
    sink: Annotated[str | None, typer.Option(
        help="The vector store (default: the first of LEGAL_BATCH_EMBEDDINGS_SINKS).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Recall@1/5/10, MRR and nDCG@10 of the current embeddings for queries with the cases (or
    chunks) each should find. Lines that are not queries are listed on stderr as file:line and left
    out; the exit code is 1 if any was."""
    from legal_batch.cli import _connect, _provider
    from legal_batch.flows.embeddings.evaluation import evaluate as run_evaluation
    from legal_batch.flows.embeddings.evaluation import figure_names, read_queries
    from legal_batch.settings import get_settings
    from legal_batch.sinks.registry import open_sink, parse_sink_names

    if k < 1:
        raise UserError(f"--k {k} is out of range: give 1 or more")
    settings = get_settings()
    chosen = parse_sink_names(sink, setting="--sink")[0] if sink else parse_sink_names(settings.embeddings_sinks)[0]
    query_file = read_queries(queries)
    for bad in query_file.bad_lines:
        err.print(str(bad), markup=False, highlight=False, soft_wrap=True)
    provider = _provider("embeddings")
    model = model or settings.embedding_model or provider.default_model("embeddings")
    with _connect() as conn:
        store = open_sink(chosen, model=model, dimensions=settings.embedding_dimensions, settings=settings, conn=conn)
        try:
            if store.count() == 0:
                raise UserError(f"no vectors of {model} in {store.where}: run `legal-batch embeddings run --wait`, or "
                                "give --model (or LEGAL_BATCH_EMBEDDING_MODEL) the model they were made with")
            result = run_evaluation(query_file, provider=provider, model=model, sink=store, k=k)
        finally:
            store.close()
    if as_json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        console.print(f"retrieval quality of {model} in {store.where} "
                      f"({plural(len(result.scores), 'query', 'queries')} of {query_file.name})",
                      markup=False, soft_wrap=True)
        table = Table()
        names = figure_names(k)
        for name in names:
            label = name.replace("recall_at_", "recall@").replace("ndcg_at_", "nDCG@").replace("mrr", "MRR")
            table.add_column(label, justify="right")
        table.add_row(*(f"{result.figures[name]:.3f}" for name in names))
        console.print(table)
        if result.not_embedded:
            console.print(f"{plural(result.not_embedded, 'query', 'queries')} could not be embedded (no features): "
                          "scored 0", markup=False, soft_wrap=True)
        if result.missing:
            console.print(f"{plural(len(result.missing), 'expected id')} without a vector in {store.where} "
                          f"(line: id): {', '.join(result.missing[:5])}{' ...' if len(result.missing) > 5 else ''}",
                          markup=False, soft_wrap=True)
        if query_file.bad_lines:
            console.print(f"{plural(len(query_file.bad_lines), 'line')} of {query_file.name} left out (listed on "
                          "stderr)", markup=False, soft_wrap=True)
    raise typer.Exit(1 if query_file.bad_lines else 0)
