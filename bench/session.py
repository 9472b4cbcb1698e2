"""Session service speed on Postgres + Redis, Postgres alone and SQLite, in one run.

    python bench/session.py [--clients 32] [--seconds 3] [--rounds 3] [--baseline-rev REV]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--redis redis://127.0.0.1:6379/0]

Each contender is a session service in a process of its own, called over gRPC by
`--clients` concurrent clients (one session each). Appends: one message per call.
Window reads: GetWindow on sessions of 20 messages. Postgres alone runs with the
cache turned off, the baseline of every ratio. Rounds alternate between the
contenders so machine noise hits all of them; read the ratio columns. The
in-service figure times the cached store's window() in this process against the
same Redis (what a request costs inside the service, without gRPC).
The benchmark gets a database of its own on the server and a key prefix of its own in Redis.
`--baseline-rev` adds the session service of an earlier git revision (e.g. HEAD~3), on
Postgres alone against the same database: before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import grpc  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from infermesh.common.v1 import common_pb2  # noqa: E402
from infermesh.session.v1 import session_pb2, session_pb2_grpc  # noqa: E402
from services.common.server import wait_serving  # noqa: E402
from services.session import migrate  # noqa: E402
from services.session.cache import CachedStore  # noqa: E402
from services.session.crypto import KeyRing  # noqa: E402
from services.session.redis_cache import RedisWindowCache  # noqa: E402
from services.session.sql_store import SqlStore  # noqa: E402

TENANT = "bench"
WINDOW_MESSAGES = 20
BUDGET = 4096
KEYS = KeyRing.new_entry("bench")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Contender:
    name: str
    env: dict[str, str]
    appends: list[float] = field(default_factory=list)  # appends/s per round
    append_lat: list[float] = field(default_factory=list)
    # CPU seconds the service process spent per append (steadier than appends/s on a busy machine).
    append_cpu: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)
    read_lat: list[float] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    address: str = ""
    # Where `services` is imported from (another revision's source tree).
    source: Path = ROOT

    async def start(self, folder: Path) -> None:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.log = folder / f"{self.name.replace(' ', '_').replace('+', 'p')}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}
        env.update(
            {
                "INFERMESH_SESSION_PORT": str(port),
                "INFERMESH_SESSION_ENCRYPTION_KEYS": KEYS,
                "INFERMESH_SESSION_POOL_SIZE": "16",
                "INFERMESH_SESSION_LOG_LEVEL": "info",
                **self.env,
            }
        )
        if self.source != ROOT:
            # That revision's services, this checkout's generated protos.
            env["PYTHONPATH"] = os.pathsep.join([str(self.source), str(ROOT)])
        self._spawn(env)
        await wait_serving(self.address, timeout=60)

    def _spawn(self, env: dict[str, str]) -> None:
        assert self.log is not None
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.session"],
                cwd=self.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def cpu_s(self) -> float:
        """CPU time (user + system) of the service process so far; NaN where /proc is missing."""
        try:
            fields = (
                Path(f"/proc/{self.proc.pid if self.proc else 0}/stat").read_text().rsplit(")", 1)[1].split()
            )
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, float]:
        """Stop the server; returns its window cache stats (logged at shutdown)."""
        if self.proc is None:
            return {}
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for line in reversed(self.log.read_text().splitlines()) if self.log else []:
            if '"window cache stats"' in line:
                return json.loads(line)
        return {}


async def sessions_for(stub: session_pb2_grpc.SessionStoreStub, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        created = await stub.CreateSession(
            session_pb2.CreateSessionRequest(tenant=TENANT, user_id="bench", model="smollm2-135m-instruct")
        )
        ids.append(created.session_id)
    return ids


async def run_clients(seconds: float, clients: int, call: object) -> tuple[int, list[float]]:
    """`clients` loops calling `call(i)` for `seconds`; returns (calls done, latencies)."""
    latencies: list[float] = []
    done = 0
    end = time.perf_counter() + seconds

    async def loop(i: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            started = time.perf_counter()
            await call(i)  # type: ignore[operator]
            latencies.append(time.perf_counter() - started)
            done += 1

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return done, latencies


async def bench_appends(c: Contender, clients: int, seconds: float) -> None:
    async with grpc.aio.insecure_channel(c.address) as channel:
        stub = session_pb2_grpc.SessionStoreStub(channel)
        ids = await sessions_for(stub, clients)
        text = "a user turn of ordinary length, a sentence or two. " * 4

        async def call(i: int) -> None:
            await stub.AppendMessages(
                session_pb2.AppendMessagesRequest(
                    tenant=TENANT,
                    session_id=ids[i],
                    messages=[common_pb2.NewMessage(role=common_pb2.ROLE_USER, content=text)],
                ),
                timeout=30,
            )

        started, cpu = time.perf_counter(), c.cpu_s()
        done, latencies = await run_clients(seconds, clients, call)
        c.appends.append(done / (time.perf_counter() - started))
        c.append_cpu.append((c.cpu_s() - cpu) / max(done, 1))
        c.append_lat.extend(latencies)


async def bench_reads(c: Contender, clients: int, seconds: float) -> None:
    async with grpc.aio.insecure_channel(c.address) as channel:
        stub = session_pb2_grpc.SessionStoreStub(channel)
        ids = await sessions_for(stub, clients)
        for session_id in ids:
            await stub.AppendMessages(
                session_pb2.AppendMessagesRequest(
                    tenant=TENANT,
                    session_id=session_id,
                    messages=[
                        common_pb2.NewMessage(role=common_pb2.ROLE_USER, content=f"message {n} " * 10)
                        for n in range(WINDOW_MESSAGES)
                    ],
                )
            )

        async def call(i: int) -> None:
            await stub.GetWindow(
                session_pb2.GetWindowRequest(tenant=TENANT, session_id=ids[i], token_budget=BUDGET),
                timeout=30,
            )

        started = time.perf_counter()
        done, latencies = await run_clients(seconds, clients, call)
        c.reads.append(done / (time.perf_counter() - started))
        c.read_lat.extend(latencies)


async def in_service_window(
    database_url: str, redis_url: str, prefix: str, calls: int
) -> tuple[list[float], float]:
    """Warm window() latencies of the cached store in this process, and its hit ratio."""
    keys = KeyRing.parse(KEYS)
    sql = SqlStore.from_url(database_url, keys=keys)
    store = CachedStore(sql, RedisWindowCache(redis_url, prefix=prefix, keys=keys))
    try:
        from services.session.model import NewMessage, NewSession, Role

        info = await store.create_session(NewSession(TENANT, "bench", "m"))
        await store.append(
            TENANT,
            info.session_id,
            [NewMessage(int(Role.USER), f"m {n} " * 10, token_count=20) for n in range(20)],
        )
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            await store.window(TENANT, info.session_id, BUDGET)
            latencies.append(time.perf_counter() - started)
        return latencies, store.stats.hit_ratio
    finally:
        await store.close()


def export_revision(rev: str, folder: Path) -> Path:
    """The services/ tree of git revision `rev`, unpacked under `folder`."""
    target = folder / "rev"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "services"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


async def main_async(args: argparse.Namespace) -> None:
    server_url = args.postgres
    db_name = f"infermesh_bench_{secrets.token_hex(4)}"
    admin = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{db_name}"')
    await conn.close()
    pg_url = make_url(server_url).set(drivername="postgresql+asyncpg", database=db_name)
    pg = pg_url.render_as_string(hide_password=False)
    prefix = f"bench:{secrets.token_hex(4)}"
    folder = Path(tempfile.mkdtemp(prefix="infermesh-bench-session-"))
    contenders = [
        Contender(
            "postgres alone (no cache)",
            {"INFERMESH_SESSION_DATABASE_URL": pg, "INFERMESH_SESSION_CACHE_MAX_SESSIONS": "0"},
        ),
        Contender(
            "postgres + redis",
            {
                "INFERMESH_SESSION_DATABASE_URL": pg,
                "INFERMESH_SESSION_REDIS_URL": args.redis,
                "INFERMESH_SESSION_REDIS_PREFIX": prefix,
            },
        ),
        Contender("sqlite + in-process cache", {"INFERMESH_SESSION_STATE_DIR": str(folder / "sqlite")}),
    ]
    if args.baseline_rev:
        contenders.append(
            Contender(
                f"postgres alone @ {args.baseline_rev}"[:27],
                {
                    "INFERMESH_SESSION_DATABASE_URL": pg,
                    "INFERMESH_SESSION_CACHE_MAX_SESSIONS": "0",
                    # The schema is this checkout's; that revision must not migrate it.
                    "INFERMESH_SESSION_AUTO_MIGRATE": "false",
                },
                source=export_revision(args.baseline_rev, folder),
            )
        )
    stats: dict[str, dict[str, float]] = {}
    try:
        await migrate.upgrade(pg)
        for c in contenders:
            await c.start(folder)
        for _ in range(args.rounds):
            for c in contenders:
                await bench_appends(c, args.clients, args.seconds)
            for c in contenders:
                await bench_reads(c, args.clients, args.seconds)
        inside, inside_ratio = await in_service_window(pg, args.redis, prefix + ":inproc", args.inside_calls)
    finally:
        for c in contenders:
            stats[c.name] = c.stop()
        client = aioredis.Redis.from_url(args.redis)
        async for key in client.scan_iter(match=f"{prefix}*"):
            await client.unlink(key)
        await client.aclose()
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await conn.close()
        shutil.rmtree(folder, ignore_errors=True)

    base = contenders[0]
    base_app, base_read = statistics.median(base.appends), statistics.median(base.reads)
    print(
        f"\nsession service over gRPC, {args.clients} concurrent clients, {args.rounds} rounds x "
        f"{args.seconds:.0f} s each, medians of rounds; ratios against postgres alone\n"
    )
    print(
        f"| {'contender':<27} | {'appends/s':>9} | {'ratio':>6} | {'p50 ms':>6} | {'p99 ms':>6} "
        f"| {'CPU ms':>6} "
        f"| {'windows/s':>9} | {'ratio':>6} | {'p50 ms':>6} | {'p99 ms':>6} | {'hit ratio':>9} |"
    )
    print("|" + "|".join("-" * w for w in (29, 11, 8, 8, 8, 8, 11, 8, 8, 8, 11)) + "|")
    for c in contenders:
        app, read = statistics.median(c.appends), statistics.median(c.reads)
        hit = stats.get(c.name, {}).get("hit_ratio", float("nan"))
        cells = [
            f"{c.name:<27}",
            f"{app:>9.0f}",
            f"{app / base_app:>5.2f}x",
            f"{percentile(c.append_lat, 0.5) * 1e3:>6.2f}",
            f"{percentile(c.append_lat, 0.99) * 1e3:>6.2f}",
            f"{statistics.median(c.append_cpu) * 1e3:>6.2f}",
            f"{read:>9.0f}",
            f"{read / base_read:>5.2f}x",
            f"{percentile(c.read_lat, 0.5) * 1e3:>6.2f}",
            f"{percentile(c.read_lat, 0.99) * 1e3:>6.2f}",
            f"{hit:>9.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nCPU ms: CPU time of the service process per append (user + system), a steadier figure "
        "than appends/s when other work shares the machine."
    )
    print(
        f"\nwarm window() inside the service (cached store on Redis, one caller, {len(inside)} calls): "
        f"p50 {percentile(inside, 0.5) * 1e3:.3f} ms, p99 {percentile(inside, 0.99) * 1e3:.3f} ms, "
        f"hit ratio {inside_ratio:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inside-calls", type=int, default=2000)
    parser.add_argument("--baseline-rev", help="also run the session service of this git revision")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
