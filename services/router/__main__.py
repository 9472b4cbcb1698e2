"""`python -m services.router [--config FILE]`: run the router until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import ConfigError, load_config
from services.common.logs import configure_logging
from services.common.telemetry import configure_tracing
from services.router.config import RouterConfig
from services.router.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router", description="infermesh router")
    parser.add_argument("--config", help="TOML file with a [router] table")
    args = parser.parse_args(argv)
    try:
        config = load_config(RouterConfig, "router", path=args.config)
    except ConfigError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    configure_logging("router", config.log_level)
    configure_tracing("router", config.otlp_endpoint)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
