"""`python -m services.session [--config FILE]` serves; `... migrate [--downgrade REV]` migrates;
`... rotate-keys` re-seals stored messages with the active key; `... create-key --tenant T --role R`
stores a new API key (e.g. the first admin key) and prints it, once."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging

from services.common import apikeys
from services.common.config import ConfigError, load_config
from services.common.logs import configure_logging
from services.common.telemetry import configure_tracing
from services.session import db, migrate
from services.session.config import SessionConfig
from services.session.crypto import load_key_ring
from services.session.keys_store import KeyRecord, KeysStore
from services.session.server import serve
from services.session.sql_store import SqlStore

logger = logging.getLogger("services.session")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.session", description="infermesh session service"
    )
    parser.add_argument("--config", help="TOML config file ([session] table)")
    commands = parser.add_subparsers(dest="command")
    migrate_cmd = commands.add_parser("migrate", help="migrate the database schema and exit")
    migrate_cmd.add_argument("--to", default="head", help="revision to upgrade to (default: head)")
    migrate_cmd.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    commands.add_parser(
        "rotate-keys", help="re-encrypt messages sealed with older keys (or none) with the active key"
    )
    key_cmd = commands.add_parser(
        "create-key", help="store a new API key (e.g. the first admin key) and print it once"
    )
    key_cmd.add_argument("--tenant", required=True)
    key_cmd.add_argument("--role", required=True, help="a role the routers know, e.g. admin")
    key_cmd.add_argument("--description", default="")
    args = parser.parse_args(argv)

    try:
        config = load_config(SessionConfig, "session", path=args.config)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    configure_logging("session", config.log_level)
    configure_tracing("session", config.otlp_endpoint)

    if args.command == "migrate":
        url = db.resolve_url(config.database_url, config.state_dir)
        if args.downgrade:
            asyncio.run(migrate.downgrade(url, args.downgrade, timeout_s=config.db_timeout_s))
        else:
            asyncio.run(migrate.upgrade(url, args.to, timeout_s=config.db_timeout_s))
        logger.info("migrated", extra={"revision": args.downgrade or args.to})
        return 0
    if args.command == "rotate-keys":
        rewritten = asyncio.run(rotate_keys(config))
        logger.info("keys rotated", extra={"rewritten": rewritten})
        return 0
    if args.command == "create-key":
        print(asyncio.run(create_key(config, args.tenant, args.role, args.description)))
        return 0
    asyncio.run(serve(config))
    return 0


async def create_key(config: SessionConfig, tenant: str, role: str, description: str) -> str:
    """Straight into the database (migrated first): how the first admin key comes to be."""
    url = db.resolve_url(config.database_url, config.state_dir)
    await migrate.upgrade(url, timeout_s=config.db_timeout_s)
    new = apikeys.generate()
    engine = db.create_engine(url, pool_size=1, timeout_s=config.db_timeout_s)
    try:
        record = KeyRecord(
            new.prefix, tenant, role, description, new.salt, new.key_hash, dt.datetime.now(dt.UTC)
        )
        await KeysStore(engine).put_key(record, actor="bootstrap")
    finally:
        await engine.dispose()
    logger.info("API key created", extra={"tenant": tenant, "role": role, "key_prefix": new.prefix})
    return new.key


async def rotate_keys(config: SessionConfig) -> int:
    url = db.resolve_url(config.database_url, config.state_dir)
    keys = load_key_ring(config.encryption_keys, config.state_dir)
    store = SqlStore.from_url(url, pool_size=1, timeout_s=config.db_timeout_s, keys=keys)
    try:
        return await store.rotate_keys()
    finally:
        await store.close()


if __name__ == "__main__":
    raise SystemExit(main())
