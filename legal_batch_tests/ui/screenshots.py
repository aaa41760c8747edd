"""`make ui-check`: the UI on a demo instance, opened in a real headless Chromium, with screenshots
of the asset graph, a shard's page and the progress plot saved under `--out` (docs/).

Everything it starts it stops: a temporary home with its own embedded Postgres (unless
`LEGAL_BATCH_DATABASE_URL` names a server, where it uses a database of its own and drops it), the
demo run, `make dev`'s server and the browser.

    python -m legal_batch_tests.ui.screenshots --out docs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from legal_batch_tests.ui.browser import Page, chromium
from legal_batch_tests.ui.support import DEMO_ENV, free_port, run_demo, ui_server


def take(page: Page, url: str, shards: dict[str, list[str]], out: Path) -> list[Path]:
    saved = []
    # the asset graph: every group expanded, the flows hanging off the source assets
    page.open(f"{url}/asset-groups")
    page.wait_for_text("template")
    time.sleep(2)
    page.click_text("Hide navigation")  # room for the graph (kept for the next pages too)
    page.evaluate("""(() => { const panels = [...document.querySelectorAll('button [aria-label=panel_show_right]')];
                              panels[panels.length - 1].closest('button').click(); })()""")  # the groups list
    time.sleep(1)
    page.evaluate("""(() => { const icons = [...document.querySelectorAll('button [aria-label=settings]')];
                              icons[icons.length - 1].closest('button').click(); })()""")  # the graph's settings
    time.sleep(1)
    page.click_text("Expand all groups")
    page.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    page.wait_for_text("court_cases")
    time.sleep(3)
    saved.append(page.screenshot(out / "ui-asset-graph.png"))

    # a shard: its batch job's partition, with the job's current state
    shard = shards["embeddings"][0]
    page.open(f"{url}/assets/embedding_batch_jobs?view=partitions&partition={shard}")
    page.wait_for_text("ingested")
    time.sleep(2)
    saved.append(page.screenshot(out / "ui-shard.png"))

    # the flow's totals over time
    page.open(f"{url}/assets/embedding_progress", height=1700)
    page.wait_for_text("items_done")
    page.click_text("Plots")
    time.sleep(4)
    saved.append(page.screenshot(out / "ui-progress-plot.png"))
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    work = Path(tempfile.mkdtemp(prefix="lb-ui-check-"))
    home = work / "home"
    configured = os.environ.get("LEGAL_BATCH_DATABASE_URL")
    database = None

    from legal_batch.db import embedded

    try:
        if configured:
            import psycopg

            database = f"lb_ui_check_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(configured, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{database}"')
            base, _, query = configured.partition("?")
            url = f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")
        else:
            home.mkdir(parents=True)
            url = embedded.start(home)
        os.environ.update(DEMO_ENV, LEGAL_BATCH_HOME=str(home), LEGAL_BATCH_DATABASE_URL=url,
                          DAGSTER_HOME=str(work / "dagster"))
        (work / "dagster" / ".nux").mkdir(parents=True)
        (work / "dagster" / ".nux" / "nux.yaml").write_text("seen: 1\n")  # no newsletter pop-up over the pages
        print("running the demo flows on the local provider ...", flush=True)
        shards = run_demo(work / "dagster")
        print("starting the UI (make dev) ...", flush=True)
        with ui_server(dict(os.environ), work / "ui.log") as server, chromium(free_port()) as page:
            for path in take(page, server.url, shards, out):
                print(f"saved {path}", flush=True)
    finally:
        if database is not None:
            import psycopg

            with psycopg.connect(configured, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        if embedded.stop(home):
            print("stopped the demo's embedded Postgres", flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
