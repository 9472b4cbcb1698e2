"""`python -m services.worker [--config FILE]`: run one generation worker."""

from __future__ import annotations

import argparse
import asyncio
import os

from services.common.config import load_config
from services.common.logs import configure_logging
from services.common.telemetry import configure_tracing
from services.worker.config import WorkerConfig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.worker", description=__doc__)
    parser.add_argument("--config", help="TOML file with a [worker] table")
    args = parser.parse_args()
    # Models come from local files only; never reach for the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(WorkerConfig, "worker", path=args.config)
    configure_logging("worker", config.log_level)
    configure_tracing("worker", config.otlp_endpoint)
    from services.worker.server import serve

    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
