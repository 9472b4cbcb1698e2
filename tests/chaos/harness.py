"""The chaos drills' toolbox: services as real processes, a TCP fault proxy, and the drill record.

- `ServiceProcess`: `python -m services.<name>` configured through its environment, waited for
  until SERVING, then killed, stopped (SIGSTOP), continued or terminated like any process.
- `FaultProxy`: a TCP proxy in its own thread that adds latency, resets connections or refuses
  them, to put between two services (or a service and its database).
- `DrillResult` and `format_table`: what each drill measured; `tests/chaos/conftest.py` prints
  every recorded result as one table at the end of the run.
- Throwaway Postgres and Redis come from `tests.fixtures.databases` (`ThrowawayPostgres`,
  `ThrowawayRedis`): never the shared servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path

from services.common.server import wait_serving
from tests.fixtures.databases import ThrowawayPostgres, ThrowawayRedis

__all__ = [
    "DrillResult",
    "FaultProxy",
    "Faults",
    "ServiceProcess",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "format_table",
    "free_port",
    "record",
    "recorded",
    "recording",
    "wait_until",
]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- drill results -------------------------------------------------------------


@dataclasses.dataclass
class DrillResult:
    """One drill's figures, a row of the `make chaos` table.

    `lost` counts acknowledged messages (or tokens) that are missing afterwards; `duplicates`
    those present more than once. `recovery_s` is from the fault's end (or its start, for faults
    that are healed by the system itself) until the service answered normally again; None when
    the drill does not measure one.
    """

    drill: str
    load: str
    injected: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicates: int = 0
    recovery_s: float | None = None
    note: str = ""
    passed: bool | None = None


_RESULTS: list[DrillResult] = []


def record(result: DrillResult) -> DrillResult:
    """Keep `result` for the table printed at the end of the run; returns it."""
    _RESULTS.append(result)
    return result


def recorded() -> list[DrillResult]:
    return list(_RESULTS)


@contextlib.contextmanager
def recording(result: DrillResult) -> Iterator[DrillResult]:
    """Record `result` when the block ends; a drill that raised before deciding is a FAIL."""
    try:
        yield result
    finally:
        if result.passed is None:
            result.passed = False
        record(result)


_COLUMNS = ("drill", "load", "injected", "total", "ok", "failed", "lost", "dup", "recovery", "result")


def _row(r: DrillResult) -> tuple[str, ...]:
    verdict = {True: "pass", False: "FAIL", None: "-"}[r.passed]
    recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f} s"
    cells = (r.drill, r.load, r.injected, r.total, r.completed, r.failed, r.lost, r.duplicates)
    return (*(str(c) for c in cells), recovery, verdict + (f" ({r.note})" if r.note else ""))


def format_table(results: Iterable[DrillResult]) -> str:
    """A plain-text table, one row per drill."""
    rows = [_COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- services as processes -----------------------------------------------------


class ServiceProcess:
    """One service as its own process, configured only through INFERMESH_<SVC>_* variables."""

    def __init__(self, service: str, env: Mapping[str, str], log_dir: Path, port: int | None = None) -> None:
        self.service = service
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        prefix = f"INFERMESH_{service.upper()}_"
        self.env = {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(self.port), **env}
        self.log = log_dir / f"{service}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.service}"],
                env={**os.environ, **self.env},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def wait_serving(self, timeout: float = 60.0) -> None:
        try:
            await wait_serving(self.address, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{self.service}: {exc}\n{self.log_tail()}") from None
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.service} exited during start:\n{self.log_tail()}")

    async def started(self, timeout: float = 60.0) -> ServiceProcess:
        self.start()
        await self.wait_serving(timeout)
        return self

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send `sig` and wait for the exit; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # A stopped process cannot act on SIGTERM until it runs again.
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


# --- TCP fault proxy -----------------------------------------------------------


@dataclasses.dataclass
class Faults:
    """What the proxy does to traffic now; change it at any time."""

    # Added before each chunk is forwarded, in each direction.
    latency_s: float = 0.0
    # Extra random latency, uniform in [0, jitter_s].
    jitter_s: float = 0.0
    # Chance, per forwarded chunk, that both sides of the connection are reset.
    reset_probability: float = 0.0
    # New connections are reset at once (the service looks unreachable).
    refuse: bool = False


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target` with injected faults, on its own event loop thread so
    that a busy test loop does not distort the latency it adds."""

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.faults = Faults()
        self.resets = 0
        self.connections = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()
        self._call(self._start_server())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop_server())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def set(self, **changes: float | bool) -> None:
        """Change the faults, e.g. `proxy.set(latency_s=0.05, reset_probability=0.01)`."""
        self.faults = dataclasses.replace(self.faults, **changes)

    def heal(self) -> None:
        self.faults = Faults()

    def reset_all(self) -> None:
        """Reset every open connection now (the link flaps)."""
        self._loop.call_soon_threadsafe(self._reset_all)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            self._reset_all()
            await self._server.wait_closed()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _reset_all(self) -> None:
        for writer in list(self._open):
            self._reset(writer)

    def _reset(self, writer: asyncio.StreamWriter) -> None:
        """Close with RST rather than FIN, as a broken link or a dying peer does."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self._open.discard(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.faults.refuse:
            self.resets += 1
            self._reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(writer)
            return
        self._open |= {writer, up_writer}
        pair = (writer, up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair))
        except asyncio.CancelledError:
            # The proxy is closing. Ending normally keeps asyncio's stream callback from logging
            # the cancellation as an error.
            for w in pair:
                self._reset(w)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                faults = self.faults
                delay = faults.latency_s + (
                    self._random.uniform(0, faults.jitter_s) if faults.jitter_s else 0
                )
                if delay > 0:
                    await asyncio.sleep(delay)
                if faults.refuse or (
                    faults.reset_probability and self._random.random() < faults.reset_probability
                ):
                    self.resets += 1
                    for writer in pair:
                        self._reset(writer)
                    return
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError, RuntimeError):
            dst.close()
        self._open.discard(dst)


async def wait_until(
    predicate: Callable[[], object | Awaitable[object]], timeout: float, interval: float = 0.05
) -> float:
    """Poll a sync or async predicate until true; returns the seconds it took (TimeoutError after)."""
    start = time.monotonic()
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout:.1f}s")
        await asyncio.sleep(interval)
