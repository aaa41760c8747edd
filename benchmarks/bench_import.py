"""Throughput and memory of `legal-batch cases import` (`core.corpus_import`) on the embedded Postgres.

    python -m benchmarks.bench_import [--mb 300] [--small-mb 60] [--formats jsonl,cap]

For each format a file of `--mb` MB and one of `--small-mb` MB are generated from the real judgments
in /work/shared/corpora (or `--corpus`), each case under its own id with its text varied:

- jsonl: one `{id, case_name, citation, court, decision_date, full_text}` object a line;
- cap:   CAP bulk-export lines (`casebody.data` = the XML form: head matter, `<opinion>` with an
         `<author>`, one `<p>` per paragraph, page numbers and footnote marks inline, a footnote),
         with `court.name`, `citations[]`, `name_abbreviation`.

Stages, each in a fresh Python process (so each peak RSS is that stage's own), on a throwaway
database `lb_bench_<random>_import` of the embedded server under `.legal_batch/bench` (dropped at
the end; one benchmark run at a time):

1. parse   read + map every record (`read_records` + `to_case`), no database: the parsing ceiling;
2. import  `import_cases` into an empty `court_cases` — MB/s of input, cases/s, peak RSS;
3. again   the same file again (every case unchanged: read, compare, write nothing);
4. small   the `--small-mb` file into an empty table: its peak RSS next to (2)'s shows memory does
           not grow with the file.

Prints one `name=value` per line on stdout (progress on stderr) and writes them to
`benchmarks/results/import.json`. Timings are of this machine at this moment (the load average is
recorded); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a stage runs this file as a script from the bench home
    sys.path.insert(0, str(ROOT))

from benchmarks import throwaway  # noqa: E402
from benchmarks.bench_embeddings import Bench, log, peak_rss_mb, rate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "import.json"
CORPUS = Path("/work/shared/corpora")
MB = 1_000_000

Figures = dict[str, float | int | str]


# -- generated input ----------------------------------------------------------------------------------

def _judgments(corpus: Path) -> list[dict]:
    found = [json.loads(line) for name in ("us_opinions.jsonl", "zh_judgments.jsonl")
             if (corpus / name).exists() for line in (corpus / name).read_text(encoding="utf-8").splitlines()]
    if not found:
        raise SystemExit(f"no judgments in {corpus}: give --corpus")
    return found


def _varied(paragraphs: list[str], index: int, rng: random.Random) -> list[str]:
    """The paragraphs with a numbered first line and one paragraph moved, so no two cases are equal."""
    varied = [f"Case {index}.", *paragraphs]
    if len(varied) > 3:
        moved = varied.pop(rng.randrange(1, len(varied)))
        varied.insert(rng.randrange(1, len(varied)), moved)
    return varied


def _jsonl_line(source: dict, index: int, paragraphs: list[str]) -> dict:
    return {"id": f"bench:{index}", "case_name": source["case_name"], "citation": source["citation"],
            "court": source["court"], "decision_date": source["decision_date"], "full_text": "\n\n".join(paragraphs)}


def _cap_line(source: dict, index: int, paragraphs: list[str]) -> dict:
    head, body = paragraphs[:4], paragraphs[4:] or paragraphs[-1:]
    parts = [f'<p id="b{index}-{n}">{escape(text)}</p>' for n, text in enumerate(body[1:], start=2)]
    for n in range(3, len(parts), 7):  # page numbers and footnote marks inline, as CAP has them
        parts[n] = parts[n].replace("</p>", f'<footnotemark>{n}</footnotemark></p>', 1).replace(
            ">", f'><page-number citation-index="1" label="{n}">*{n}</page-number>', 1)
    xml = ("<?xml version='1.0' encoding='utf-8'?>\n"
           '<casebody xmlns="http://nrs.harvard.edu/urn-3:HLS.Libr.US_Case_Law.Schema.Case_Body:v1" '
           'firstpage="1" lastpage="9">\n'
           + "".join(f'<parties id="h{n}">{escape(text)}</parties>\n' for n, text in enumerate(head))
           + f'<opinion type="majority">\n<author id="a{index}">{escape(body[0])}</author>\n' + "\n".join(parts)
           + '\n<footnote label="3"><p>A footnote.</p></footnote>\n</opinion>\n</casebody>\n')
    return {"id": 10_000_000 + index, "name": source["case_name"], "name_abbreviation": source["case_name"],
            "decision_date": source["decision_date"], "docket_number": "",
            "citations": [{"type": "official", "cite": source["citation"]}],
            "court": {"id": 1, "name": source["court"], "name_abbreviation": source["court"][:20]},
            "casebody": {"status": "ok", "data": xml}}


def _records(format: str, judgments: list[dict], rng: random.Random) -> Iterator[bytes]:
    import orjson

    make = _cap_line if format == "cap" else _jsonl_line
    index = 0
    while True:
        source = judgments[index % len(judgments)]
        paragraphs = [p for p in source["full_text"].split("\n\n") if p.strip()]
        yield orjson.dumps(make(source, index, _varied(paragraphs, index, rng))) + b"\n"
        index += 1


def generate(path: Path, *, format: str, megabytes: float, corpus: Path) -> int:
    """Write `path` (`format` lines) up to `megabytes` MB; returns the number of cases."""
    rng = random.Random(42)
    judgments = _judgments(corpus)
    written = cases = 0
    with path.open("wb") as handle:
        for line in _records(format, judgments, rng):
            handle.write(line)
            written += len(line)
            cases += 1
            if written >= megabytes * MB:
                break
    return cases


# -- stages (each in its own process; environment: LEGAL_BATCH_HOME, LEGAL_BATCH_DATABASE_URL) ----------

def stage_parse(params: dict) -> Figures:
    from legal_batch.core.corpus_import import FieldMap, find_sources, read_records, to_case

    source = find_sources(params["file"]).files[0]
    fields = FieldMap()
    started = time.perf_counter()
    cases = 0
    for _, record, problem in read_records(source):
        if problem is None and record is not None:
            to_case(record, fields)
            cases += 1
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "cases": cases, "mb_per_s": rate(source.size / MB, seconds),
            "cases_per_s": rate(cases, seconds), "peak_rss_mb": peak_rss_mb()}


class RssSampler(threading.Thread):
    """The highest resident set size of this process while it runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.highest = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.highest = max(self.highest, self.process.memory_info().rss)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return round(self.highest / 2**20, 1)


def stage_import(params: dict) -> Figures:
    import psutil

    from legal_batch.core.corpus_import import find_sources, import_cases
    from legal_batch.db import connect

    sources = find_sources(params["file"])
    with connect(os.environ["LEGAL_BATCH_DATABASE_URL"]) as conn:
        if params.get("empty", True):
            conn.execute("TRUNCATE court_cases CASCADE")
            conn.execute("CHECKPOINT")
        rss_before = round(psutil.Process().memory_info().rss / 2**20, 1)
        sampler = RssSampler()
        sampler.start()
        started = time.perf_counter()
        report = import_cases(conn, sources)
        seconds = time.perf_counter() - started
        rss_during = sampler.stop()
        rows = conn.execute("SELECT count(*) FROM court_cases").fetchone()[0]
    size = sources.total_bytes
    return {"mb": round(size / MB, 1), "cases": report.records_read, "inserted": report.inserted,
            "updated": report.updated, "unchanged": report.unchanged, "skipped": report.skipped, "rows": rows,
            "seconds": round(seconds, 2), "mb_per_s": rate(size / MB, seconds),
            "cases_per_s": rate(report.records_read, seconds), "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before, "rss_during_mb": rss_during}


STAGES = {"parse": stage_parse, "import": stage_import}


# -- orchestration ------------------------------------------------------------------------------------

class ImportBench(Bench):
    SCRIPT = Path(__file__).resolve()


def run(args: argparse.Namespace) -> Figures:
    figures: Figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count() or 0,
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    bench = ImportBench(keep=args.keep)
    try:
        url = bench.database("import", migrate=True)
        for format in args.formats.split(","):
            big, small = bench.home / f"{format}_big.jsonl", bench.home / f"{format}_small.jsonl"
            log(f"generating {format}: {args.mb} MB and {args.small_mb} MB")
            figures[f"{format}_generated_cases"] = generate(big, format=format, megabytes=args.mb, corpus=args.corpus)
            generate(small, format=format, megabytes=args.small_mb, corpus=args.corpus)
            parse = bench.stage("parse", url, {"file": str(big)})
            first = bench.stage("import", url, {"file": str(big)})
            again = bench.stage("import", url, {"file": str(big), "empty": False})
            smaller = bench.stage("import", url, {"file": str(small)})
            figures |= {
                f"{format}_file_mb": first["mb"], f"{format}_cases": first["cases"],
                f"{format}_parse_mb_per_s": parse["mb_per_s"], f"{format}_parse_cases_per_s": parse["cases_per_s"],
                f"{format}_import_seconds": first["seconds"], f"{format}_import_mb_per_s": first["mb_per_s"],
                f"{format}_import_cases_per_s": first["cases_per_s"], f"{format}_import_inserted": first["inserted"],
                f"{format}_import_peak_rss_mb": first["peak_rss_mb"], f"{format}_rss_before_mb": first["rss_before_mb"],
                f"{format}_import_rss_during_mb": first["rss_during_mb"],
                f"{format}_reimport_seconds": again["seconds"], f"{format}_reimport_mb_per_s": again["mb_per_s"],
                f"{format}_reimport_unchanged": again["unchanged"], f"{format}_reimport_updated": again["updated"],
                f"{format}_small_file_mb": smaller["mb"], f"{format}_small_import_mb_per_s": smaller["mb_per_s"],
                f"{format}_small_import_peak_rss_mb": smaller["peak_rss_mb"],
                f"{format}_small_import_rss_during_mb": smaller["rss_during_mb"],
            }
            for path in (big, small):
                path.unlink()
    finally:
        bench.close()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return figures


def report(figures: Figures) -> None:
    for name, value in figures.items():
        print(f"{name}={value}")
    throwaway.write_results(RESULTS, figures)


def main(argv: list[str] | None = None) -> None:
    parser = throwaway.parser(__doc__ or "", STAGES)
    parser.add_argument("--mb", type=float, default=300, help="size of the large generated file, MB")
    parser.add_argument("--small-mb", type=float, default=60, help="size of the small file (peak RSS comparison), MB")
    parser.add_argument("--formats", default="jsonl,cap", help="comma-separated subset of jsonl,cap")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder with us_opinions.jsonl, zh_judgments.jsonl")
    args = parser.parse_args(argv)
    if not throwaway.ran_stage(args, STAGES):
        report(run(args))


if __name__ == "__main__":
    main()
