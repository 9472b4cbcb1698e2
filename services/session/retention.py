"""The periodic purge of sessions past their retention (retention_days after their last update)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.session import db
from services.session.store import Store

logger = logging.getLogger(__name__)


async def purge_once(store: Store) -> int:
    """One purge; failures are logged, not raised: the next round tries again."""
    try:
        purged = await store.purge_expired()
    except Exception as exc:
        logger.warning("retention purge failed: %s", db.describe(exc))
        return 0
    if purged:
        logger.info("retention purge", extra={"sessions_purged": len(purged)})
    return len(purged)


async def purge_forever(store: Store, interval_s: float, ready: Callable[[], bool]) -> None:
    """Purge every interval_s, skipping rounds while the schema is not known to be in place."""
    while True:
        if ready():
            await purge_once(store)
        await asyncio.sleep(interval_s)
