"""`infermesh top`: a live terminal view of the cluster.

Endpoints (device, load, tokens/s, KV usage) and the admission queue by priority come from the
router's GetClusterStatus; recent degradation, refusals, shedding and failovers from the router's
Prometheus counters when its metrics address is given (`--metrics`), as totals and as the change
since the previous refresh.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc

# Router counters shown in the events table, with the labels that tell events apart.
EVENTS = {
    "infermesh_router_requests_degraded_total": ("degraded", ("step",)),
    "infermesh_router_failovers_total": ("failover", ("kind", "reason")),
    "infermesh_router_requests_refused_total": ("refused", ("reason",)),
    "infermesh_router_requests_shed_total": ("shed", ("priority", "reason")),
    "infermesh_router_guardrail_hits_total": ("guardrail", ("check", "action")),
}

Counts = Mapping[tuple[str, str], float]


@dataclass(frozen=True)
class Frame:
    """What one refresh shows: the cluster status and the router's event counters."""

    status: router_pb2.ClusterStatus
    counts: Counts | None  # None: no metrics address, or it did not answer
    previous: Counts | None = None
    error: str = ""


def fetch_counts(metrics_address: str, timeout: float = 5.0) -> Counts:
    """(event, label values) -> count, from the router's /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            event = EVENTS.get(sample.name)
            if event is not None:
                name, labels = event
                key = (name, " ".join(sample.labels.get(label, "") for label in labels))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _kind(kind: int) -> str:
    return router_pb2.EndpointKind.Name(kind).removeprefix("ENDPOINT_KIND_").lower()


def _kv(load: common_pb2.LoadReport) -> Text:
    if not load.kv_blocks_total:
        return Text("-")
    used = load.kv_blocks_total - load.kv_blocks_free
    share = used / load.kv_blocks_total
    width = 10
    filled = round(share * width)
    style = "red" if share > 0.9 else "yellow" if share > 0.7 else "green"
    return Text.assemble(
        ("█" * filled, style), ("░" * (width - filled), "dim"), f" {share:4.0%} {used}/{load.kv_blocks_total}"
    )


def endpoints_table(status: router_pb2.ClusterStatus) -> Table:
    table = Table(title="endpoints", title_justify="left", expand=True)
    for column in (
        "kind",
        "address",
        "health",
        "device",
        "running",
        "waiting",
        "tok/s",
        "KV cache",
        "prefix hit",
        "report",
    ):
        table.add_column(column, no_wrap=column in ("address", "KV cache"))
    for ep in sorted(status.endpoints, key=lambda e: (e.kind, e.address)):
        health = Text("up", "green") if ep.healthy else Text("down", "red")
        if ep.HasField("load"):
            load = ep.load
            draining = " draining" if load.draining else ""
            device = f"{load.device.name} {load.device.dtype}".strip() + draining
            speed = (
                load.decode_tokens_per_s if ep.kind == router_pb2.ENDPOINT_KIND_WORKER else load.items_per_s
            )
            cells: list[str | Text] = [
                device,
                str(load.running),
                str(load.waiting),
                f"{speed:.1f}",
                _kv(load),
            ]
            cells.append(f"{load.prefix_cache_hit_rate:.0%}" if load.prefix_cache_hit_rate else "-")
        else:
            cells = ["-", "-", "-", "-", Text("-"), "-"]
        age = f"{ep.report_age_ms} ms" if ep.report_age_ms else (ep.detail or "-")
        table.add_row(_kind(ep.kind), ep.address, health, *cells, age)
    return table


def queues_table(status: router_pb2.ClusterStatus) -> Table:
    table = Table(title="admission queue", title_justify="left")
    table.add_column("priority")
    table.add_column("waiting", justify="right")
    for queue in sorted(status.queues, key=lambda q: q.priority):
        name = common_pb2.Priority.Name(queue.priority).removeprefix("PRIORITY_").lower()
        table.add_row(name, str(queue.depth))
    return table


def events_table(counts: Counts, previous: Counts | None) -> Table:
    table = Table(
        title="events (total since the router started; recent: since the last refresh)", title_justify="left"
    )
    for column in ("event", "labels", "total", "recent"):
        table.add_column(column, justify="right" if column in ("total", "recent") else "left")
    for (event, labels), value in sorted(counts.items()):
        recent = value - previous.get((event, labels), 0.0) if previous is not None else 0.0
        style = "bold yellow" if recent > 0 else ""
        table.add_row(event, labels, f"{value:.0f}", Text(f"+{recent:.0f}" if recent else "0", style))
    if not counts:
        table.add_row("none yet", "", "0", "0")
    return table


def render(frame: Frame) -> Group:
    header = Text.assemble(
        ("infermesh top", "bold"), f"  router {frame.status.router_id}  ", time.strftime("%H:%M:%S")
    )
    parts: list[Any] = [header]
    if frame.error:
        parts.append(Text(frame.error, "red"))
    parts += [endpoints_table(frame.status), queues_table(frame.status)]
    if frame.counts is not None:
        parts.append(events_table(frame.counts, frame.previous))
    else:
        parts.append(Text("events: pass --metrics HOST:PORT (the router's metrics_port) to see them", "dim"))
    return Group(*parts)


class Top:
    """Polls the router every `interval` seconds and renders a frame."""

    def __init__(
        self, address: str, metrics_address: str | None, api_key: str | None, timeout: float
    ) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = router_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.metrics_address = metrics_address
        self.timeout = timeout
        self._previous: Counts | None = None

    def frame(self) -> Frame:
        try:
            status = self.stub.GetClusterStatus(
                router_pb2.GetClusterStatusRequest(), metadata=self.metadata, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            return Frame(
                router_pb2.ClusterStatus(), None, None, f"router: {exc.code().name}: {exc.details()}"
            )
        counts, error = None, ""
        if self.metrics_address:
            try:
                counts = fetch_counts(self.metrics_address, self.timeout)
            except OSError as exc:
                error = f"metrics at {self.metrics_address}: {exc}"
        frame = Frame(status, counts, self._previous, error)
        if counts is not None:
            self._previous = counts
        return frame

    def close(self) -> None:
        self.channel.close()


def run(
    address: str,
    *,
    metrics_address: str | None,
    api_key: str | None,
    interval: float,
    once: bool,
    timeout: float = 5.0,
    console: Console | None = None,
) -> int:
    console = console or Console()
    top = Top(address, metrics_address, api_key, timeout)
    try:
        if once:
            frame = top.frame()
            console.print(render(frame))
            return 1 if frame.error else 0
        with Live(render(top.frame()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(top.frame()))
    finally:
        top.close()
