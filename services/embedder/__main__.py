"""`python -m services.embedder [--config FILE]`: run the embedder."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.common.config import ConfigError, load_config
from services.common.logs import configure_logging
from services.common.telemetry import configure_tracing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.embedder", description=__doc__)
    parser.add_argument("--config", help="TOML file with an [embedder] table")
    args = parser.parse_args(argv)
    # The model ships with the code: never reach for the Hugging Face Hub. Set before
    # huggingface_hub is imported, which reads it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Progress bars are not JSON log lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torch's OpenMP workers spin between parallel regions by default, on the cores the event
    # loop and grpc need to take the next requests in; sleeping instead made batched throughput
    # 1.5-2x higher on a busy 2-core machine. Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from services.embedder.config import EmbedderConfig
    from services.embedder.server import serve

    try:
        config = load_config(EmbedderConfig, "embedder", path=args.config)
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging("embedder", config.log_level)
    configure_tracing("embedder", config.otlp_endpoint)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
