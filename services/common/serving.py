"""A service's own verdict on its health, for the servers built around it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class ServingSignal:
    """A service's verdict on its own health (its probe, a crash, a drain), told to every
    server built around it: each `GrpcServer` given the signal turns its gRPC health to match.
    The service owns it from construction, so no server has to be patched into the service."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._background: set[asyncio.Task[None]] = set()

    def subscribe(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    async def publish(self, serving: bool) -> None:
        for listener in self._listeners:
            await listener(serving)

    def publish_soon(self, serving: bool) -> None:
        """`publish` from code that cannot await (a crash callback); runs on the event loop."""
        task = asyncio.get_running_loop().create_task(self.publish(serving))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
