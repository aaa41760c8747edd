"""`make dev`: the Dagster UI and daemon (`dg dev`) on the instance the CLI and `make demo` use.

`python -m legal_batch.ui [--port N] [--host H]` reads and checks the settings (and `.env`) here,
starts the embedded database when no `LEGAL_BATCH_DATABASE_URL` is set (once, before the sensors
ask for it), then runs `dg dev -w <project>/workspace.yaml` from inside `$DAGSTER_HOME`
(`$LEGAL_BATCH_HOME/dagster`, with the project's instance configuration). Running it from there is
what keeps Dagster from warning that the project root's `dagster.yaml` is ignored: that file is for
`dagster dev`/`dg dev` started at the root without `DAGSTER_HOME`. Relative paths in the settings
are made absolute first, so they mean what they meant in the project folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def dev_environment(project: Path) -> tuple[list[str], dict[str, str], Path]:
    """The `dg dev` command line (without port/host), its environment and its working directory."""
    from legal_batch.db import database_url
    from legal_batch.driver import dagster_home
    from legal_batch.settings import Settings, get_settings

    settings = get_settings()  # reads `.env` into the environment and stops on a bad setting
    workspace = project / "workspace.yaml"
    if not workspace.is_file():
        raise SystemExit(f"no workspace.yaml in {project}: run `make dev` from the legal_batch project folder")
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, Path) and not value.is_absolute():
            env[f"LEGAL_BATCH_{name.upper()}"] = str((project / value).resolve())
    if not settings.database_url:
        database_url(settings)  # start the embedded server now, not from two sensors at once
    home = dagster_home()
    env["DAGSTER_HOME"] = str(home)
    dg = Path(sys.executable).with_name("dg")
    return [str(dg), "dev", "-w", str(workspace)], env, home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m legal_batch.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--port", "-p", type=int, default=None, help="webserver port (default 3000)")
    parser.add_argument("--host", "-H", default=None, help="webserver host (default 127.0.0.1)")
    args = parser.parse_args(argv)
    from legal_batch.core.errors import UserError
    from legal_batch.db import DatabaseError

    try:
        command, env, home = dev_environment(Path.cwd())
    except (UserError, DatabaseError) as exc:
        raise SystemExit(f"legal_batch: {exc}") from None
    if args.port is not None:
        command += ["--port", str(args.port)]
    if args.host is not None:
        command += ["--host", args.host]
    os.chdir(home)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
