"""Service discovery by DNS: an address written `dns:///host:port` stands for every address
the name resolves to, resolved again every few seconds. A headless Kubernetes Service
resolves to each ready pod, so the router follows (and places on) every worker pod as the
deployment scales, and lets go of pods that left."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from services.common.tasks import cancel_and_wait
from services.router.core.domain import EndpointKind
from services.router.endpoints import EndpointMonitor

logger = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
# A pod that left discovery keeps its channel this long, for the streams still running there.
RETIRED_GRACE_S = 600.0

Resolver = Callable[[str], Awaitable[set[str]]]


def split_addresses(addresses: Sequence[str]) -> tuple[list[str], list[str]]:
    """(addresses used as given, `host:port` names to resolve)."""
    static = [a for a in addresses if not a.startswith(DNS_SCHEME)]
    names = [a.removeprefix(DNS_SCHEME) for a in addresses if a.startswith(DNS_SCHEME)]
    return static, names


def plan(current: set[str], resolved: set[str]) -> tuple[set[str], set[str]]:
    """(addresses to add, addresses to retire)."""
    return resolved - current, current - resolved


async def resolve_dns(name: str) -> set[str]:
    """Every `ip:port` a `host:port` name resolves to (IPv6 in brackets); OSError when it does not."""
    host, _, port = name.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    out = set()
    for _, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        out.add(f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}")
    return out


class Discovery:
    """Keeps the endpoint monitor in step with what each name resolves to."""

    def __init__(
        self,
        endpoints: EndpointMonitor,
        names: Sequence[tuple[str, EndpointKind]],
        interval_s: float,
        resolve: Resolver = resolve_dns,
        grace_s: float = RETIRED_GRACE_S,
    ) -> None:
        self.endpoints = endpoints
        self.names = list(names)
        self.interval_s = interval_s
        self.resolve = resolve
        self.grace_s = grace_s
        self.found: dict[str, set[str]] = {name: set() for name, _ in self.names}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.names:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="discovery")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        for name, kind in self.names:
            try:
                resolved = await self.resolve(name)
            except (OSError, ValueError) as exc:
                # Keep what we had: a resolver hiccup must not empty the pool.
                logger.warning(
                    "%s: cannot resolve %s (%s); keeping %d endpoints",
                    kind.value,
                    name,
                    exc,
                    len(self.found[name]),
                )
                continue
            added, gone = plan(self.found[name], resolved)
            for address in sorted(added):
                logger.info("%s %s discovered through %s", kind.value, address, name)
                self.endpoints.add_endpoint(address, kind)
            for address in sorted(gone):
                logger.info("%s %s no longer listed by %s", kind.value, address, name)
                self.endpoints.retire_endpoint(address, self.grace_s)
            self.found[name] = resolved
