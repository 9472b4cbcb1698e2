"""DatabaseProbe: health follows the database, requests wait for the first success."""

from __future__ import annotations

from services.common.errors import Unavailable
from services.session.server import DatabaseProbe


class FlakyStore:
    def __init__(self) -> None:
        self.up = False
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if not self.up:
            raise Unavailable("down")


async def test_health_follows_the_database():
    store = FlakyStore()
    probe = DatabaseProbe(store, "unused", auto_migrate=False, interval_s=1.0, timeout_s=1.0)  # type: ignore[arg-type]
    changes: list[bool] = []

    async def set_serving(serving: bool) -> None:
        changes.append(serving)

    assert await probe.update(set_serving) is False
    assert changes == [] and not probe.ready  # already NOT_SERVING: nothing to announce
    store.up = True
    assert await probe.update(set_serving) is True
    assert await probe.update(set_serving) is True
    assert changes == [True] and probe.ready
    store.up = False
    assert await probe.update(set_serving) is False
    # Once the schema was there, requests go on to the database (and fail there) rather than wait.
    assert changes == [True, False] and probe.ready
    assert store.pings == 4
