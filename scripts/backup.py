"""Back up and restore the session database (what `make backup` and `make restore` run).

    python scripts/backup.py backup [--config FILE] [--dir backups]
    python scripts/backup.py restore FILE [--config FILE] [--clean]

The database is the session service's: `session.database_url` from the config file or
INFERMESH_SESSION_DATABASE_URL, else the SQLite file under `session.state_dir`.

- Postgres: `pg_dump --format=custom` (one consistent snapshot, taken while the service keeps
  writing) to `<dir>/session-<UTC time>.dump`; restore with `pg_restore` into an empty database
  (or `--clean` to drop and recreate the objects first), all in one transaction.
- SQLite: the sqlite3 online backup API (safe while the service runs) to
  `<dir>/session-<UTC time>.sqlite`; restore copies it back the same way (stop the service first).

A backup is written to a temporary name and renamed when complete, so a file with the final name
is always a whole backup. It holds the messages as stored: encrypted with the session keys, which
are not in it. Keep the keys (session.encryption_keys or the key file under state_dir) apart from
the backups: a restore is readable only with them.

Prints the backup's path (backup) and exits 0; on failure prints what is wrong and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import URL, make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.common.config import ConfigError, load_config  # noqa: E402
from services.session import db  # noqa: E402
from services.session.config import SessionConfig  # noqa: E402

CONNECT_TIMEOUT_S = 10


class BackupError(Exception):
    """What went wrong, in words for the operator."""


# --- where the database is ------------------------------------------------------


def database_url(config_path: str | None) -> URL:
    """The session database's SQLAlchemy URL, as the service itself resolves it."""
    try:
        config = load_config(SessionConfig, "session", path=config_path)
    except ConfigError as exc:
        raise BackupError(f"config error: {exc}") from None
    return make_url(db.resolve_url(config.database_url, config.state_dir))


def describe(url: URL) -> str:
    """host:port/database (no user or password), for messages."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database}"
    return f"Postgres {url.host or 'localhost'}:{url.port or 5432}/{url.database}"


def libpq(url: URL) -> tuple[str, dict[str, str]]:
    """(a libpq connection URL without the password, environment carrying the password)."""
    if not url.database:
        raise BackupError(f"the session database URL names no database (host {url.host}:{url.port or 5432})")
    query = dict(url.query)
    # asyncpg's `ssl=` is libpq's `sslmode=`.
    if "ssl" in query:
        query["sslmode"] = str(query.pop("ssl"))
    # URL.set(password=None) would keep the password: build the URL without one.
    plain = URL.create("postgresql", url.username, None, url.host, url.port, url.database, query)
    env = {**os.environ, "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S)}
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return plain.render_as_string(hide_password=False), env


async def _table_count(url: URL) -> int:
    """Tables in the database's public schema; BackupError when it cannot be reached."""
    import asyncpg

    dsn, env = libpq(url)
    try:
        conn = await asyncpg.connect(dsn, password=env.get("PGPASSWORD"), timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot reach {describe(url)}: {type(exc).__name__}: {exc}") from None
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"))
    finally:
        await conn.close()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} is not on PATH: install the PostgreSQL client tools "
            "(the same major version as the server, or newer)"
        )
    return found


def _run(command: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-1500:]
        raise BackupError(f"{what} failed (exit {done.returncode}): {detail}")


# --- backup ------------------------------------------------------------------------


def backup(url: URL, folder: Path, now: dt.datetime | None = None) -> Path:
    """Write one backup of the database into `folder`; returns its path."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    folder.mkdir(parents=True, exist_ok=True)
    sqlite = url.get_backend_name() == "sqlite"
    target = folder / f"session-{stamp}.{'sqlite' if sqlite else 'dump'}"
    partial = target.with_name(target.name + ".partial")
    try:
        if sqlite:
            _sqlite_copy(Path(url.database or ""), partial, must_exist=True)
        else:
            _pg_dump(url, partial)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _pg_dump(url: URL, out: Path) -> None:
    pg_dump = _tool("pg_dump")
    asyncio.run(_table_count(url))
    dsn, env = libpq(url)
    _run([pg_dump, "--format=custom", "--no-owner", f"--file={out}", f"--dbname={dsn}"], env, "pg_dump")


def _sqlite_copy(source: Path, target: Path, *, must_exist: bool) -> None:
    """Copy with SQLite's online backup API: a consistent copy even while others write."""
    if must_exist and not source.is_file():
        raise BackupError(
            f"no SQLite database at {source}: session.database_url (INFERMESH_SESSION_DATABASE_URL) "
            "is empty, so the SQLite file under session.state_dir is the database"
        )
    src = sqlite3.connect(source, timeout=CONNECT_TIMEOUT_S)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite backup of {source} failed: {exc}") from None
    finally:
        src.close()


# --- restore -----------------------------------------------------------------------


def restore(url: URL, backup_file: Path, *, clean: bool = False) -> None:
    """Load `backup_file` into the database at `url` (empty, unless `clean`)."""
    if not backup_file.is_file():
        raise BackupError(f"no backup file at {backup_file}")
    if url.get_backend_name() == "sqlite":
        if backup_file.suffix != ".sqlite":
            raise BackupError(f"{backup_file} is not a SQLite backup (.sqlite); the database is SQLite")
        target = Path(url.database or "")
        if target.exists() and target.stat().st_size > 0 and not clean:
            raise BackupError(f"{target} exists: stop the session service and pass --clean to replace it")
        _sqlite_copy(backup_file, target, must_exist=True)
        return
    if backup_file.suffix != ".dump":
        raise BackupError(f"{backup_file} is not a Postgres backup (.dump); the database is Postgres")
    pg_restore = _tool("pg_restore")
    tables = asyncio.run(_table_count(url))
    if tables and not clean:
        raise BackupError(
            f"{describe(url)} already has {tables} tables: restore into an empty database, "
            "or pass --clean to drop and recreate them"
        )
    dsn, env = libpq(url)
    command = [pg_restore, "--no-owner", "--single-transaction", "--exit-on-error", f"--dbname={dsn}"]
    if clean:
        command += ["--clean", "--if-exists"]
    _run([*command, str(backup_file)], env, "pg_restore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/backup.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML config file ([session] table)")
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("backup", help="write a timestamped backup and print its path")
    take.add_argument("--dir", default="backups", help="folder for the backups (default: backups)")
    back = commands.add_parser("restore", help="load a backup into the configured database")
    back.add_argument("file", type=Path, help="a .dump (Postgres) or .sqlite file from `backup`")
    back.add_argument(
        "--clean", action="store_true", help="replace what the database holds (default: it must be empty)"
    )
    args = parser.parse_args(argv)
    try:
        url = database_url(args.config)
        if args.command == "backup":
            print(backup(url, Path(args.dir)))
        else:
            restore(url, args.file, clean=args.clean)
            print(f"restored {args.file} into {describe(url)}")
    except BackupError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
