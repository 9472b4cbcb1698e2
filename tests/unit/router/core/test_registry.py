"""Registry state transitions: connected, serving, fresh, stale, draining, down."""

from __future__ import annotations

import pytest

from services.router.core.domain import DeviceSpec, EndpointKind, LoadSnapshot, ModelKind, ModelSpec
from services.router.core.load import EndpointLoad, LoadModel, Priors, StepModel
from services.router.core.registry import Registry

CHAT = ModelSpec("chat", ModelKind.CHAT, context_length=2048)
EMBED = ModelSpec("embed", ModelKind.EMBEDDING, embedding_dim=384)
STALE_S = 2.0


def make_registry(*workers: str, embedders: tuple[str, ...] = ()) -> Registry:
    registry = Registry(stale_after_s=STALE_S)
    for address in workers:
        registry.add(address, EndpointKind.WORKER)
    for address in embedders:
        registry.add(address, EndpointKind.EMBEDDER)
    return registry


def bring_up(
    registry: Registry, address: str, now: float, models: tuple[ModelSpec, ...] = (CHAT,), **load: int
) -> None:
    registry.on_info(address, f"id-{address}", models)
    registry.on_report(address, LoadSnapshot(**load), now)  # type: ignore[arg-type]


def detail(registry: Registry, address: str, now: float) -> str:
    return next(v.detail for v in registry.views(now) if v.address == address)


def test_new_endpoint_is_not_usable_until_up_and_reporting() -> None:
    registry = make_registry("w")
    assert not registry.is_usable("w", 0.0)
    assert detail(registry, "w", 0.0) == "down: not reached yet"
    registry.on_info("w", "id", (CHAT,))
    assert detail(registry, "w", 0.0) == "no load report yet"
    registry.on_report("w", LoadSnapshot(), 0.0)
    assert registry.is_usable("w", 0.0)
    assert detail(registry, "w", 0.0) == "ok"


def test_report_goes_stale_and_a_new_one_revives_it() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=10.0)
    assert registry.is_usable("w", 10.0 + STALE_S)
    assert not registry.is_usable("w", 10.0 + STALE_S + 0.1)
    assert detail(registry, "w", 13.0) == "stale: last load report 3.0s ago"
    registry.on_report("w", LoadSnapshot(), 13.0)
    assert registry.is_usable("w", 13.0)


def test_draining_report_makes_it_unusable() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0)
    registry.on_report("w", LoadSnapshot(draining=True), 1.0)
    assert not registry.is_usable("w", 1.0)
    assert detail(registry, "w", 1.0) == "draining"
    registry.on_report("w", LoadSnapshot(), 1.5)
    assert registry.is_usable("w", 1.5)


def test_down_reports_whether_it_was_up() -> None:
    registry = make_registry("w")
    assert not registry.on_down("w", "refused")
    bring_up(registry, "w", now=0.0)
    assert registry.on_down("w", "health turned NOT_SERVING")
    assert not registry.is_usable("w", 0.0)
    assert not registry.on_down("w", "refused")


def test_down_keeps_models_and_last_load_for_status() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0, running=4)
    registry.on_down("w", "UNAVAILABLE: connection refused")
    (view,) = registry.views(1.0)
    assert not view.usable
    assert view.detail == "down: UNAVAILABLE: connection refused"
    assert view.load is not None and view.load.running == 4
    assert view.report_age_s == 1.0
    assert registry.catalog() == [CHAT]  # still known: requests for it get UNAVAILABLE, not "unknown"
    registry.on_info("w", "id", (CHAT,))  # reconnected
    assert registry.is_usable("w", 1.0)


def test_candidates_filter_by_kind_model_usability_and_exclusion() -> None:
    registry = make_registry("w1", "w2", "w3", "w4", embedders=("e1",))
    bring_up(registry, "w1", now=0.0, running=1, waiting=2)
    bring_up(registry, "w2", now=0.0, models=(ModelSpec("other", ModelKind.CHAT),))
    bring_up(registry, "w3", now=0.0)
    registry.on_report("w3", LoadSnapshot(draining=True), 0.0)
    bring_up(registry, "w4", now=0.0, running=5)
    bring_up(registry, "e1", now=0.0, models=(EMBED,))
    assert loads(registry.candidates(EndpointKind.WORKER, "chat", 0.0)) == [("w1", 3), ("w4", 5)]
    assert loads(registry.candidates(EndpointKind.WORKER, "chat", 0.0, exclude=frozenset({"w1"}))) == [
        ("w4", 5)
    ]
    assert loads(registry.candidates(EndpointKind.EMBEDDER, "embed", 0.0)) == [("e1", 0)]
    assert registry.candidates(EndpointKind.EMBEDDER, "chat", 0.0) == []


def loads(candidates: list[EndpointLoad]) -> list[tuple[str, int]]:
    return [(c.address, c.sequences) for c in candidates]


def test_candidate_carries_backlog_speed_device_and_context() -> None:
    registry = make_registry("w")
    registry.on_info("w", "id", (CHAT,))
    device = DeviceSpec(type="cuda", memory_total_bytes=80)
    report = LoadSnapshot(
        running_tokens=30,
        waiting_tokens=12,
        decode_tokens_per_s=40.0,
        prefill_tokens_per_s=900.0,
        device=device,
    )
    registry.on_report("w", report, 0.0)
    (candidate,) = registry.candidates(EndpointKind.WORKER, "chat", 0.0)
    assert candidate == EndpointLoad(
        "w",
        backlog_tokens=42,
        waiting_tokens=12,
        decode_tokens_per_s=40.0,
        prefill_tokens_per_s=900.0,
        device_type="cuda",
        memory_total_bytes=80,
        context_length=2048,
    )


def test_placed_tokens_count_until_a_report_can_show_them() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0, running_tokens=10)
    registry.on_placed("w", 5, now=1.0)
    registry.on_placed("w", 7, now=1.0)
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.0)[0].backlog_tokens == 22
    registry.on_report("w", LoadSnapshot(running_tokens=20), 1.2)  # now includes what was placed
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.2)[0].backlog_tokens == 20


def test_a_report_right_after_a_burst_does_not_forget_it() -> None:
    # The burst's requests are still on their way: the report cannot show them yet, and
    # forgetting them would make this endpoint look idle to the rest of the burst.
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0)
    for _ in range(8):
        registry.on_placed("w", 10, now=1.0, prompt_tokens=4)
    registry.on_report("w", LoadSnapshot(running=1), 1.0 + registry.report_lag_s / 2)
    [candidate] = registry.candidates(EndpointKind.WORKER, "chat", 1.01)
    assert (candidate.sequences, candidate.pending_prompt_tokens) == (9, 32)


def test_requests_ended_since_the_report_stop_counting_until_the_next() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0)
    burst = [registry.on_placed("w", 10, now=1.0) for _ in range(4)]
    registry.on_report("w", LoadSnapshot(running=4), 1.2)  # shows the burst
    for placed in burst[:3]:
        registry.on_released(placed)  # ended after that report: it still says 4
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.3)[0].sequences == 1
    registry.on_report("w", LoadSnapshot(running=1), 1.4)
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.4)[0].sequences == 1


def test_released_before_any_report_stops_counting() -> None:
    """Sequential requests between two reports must not pile up backlog that no report clears."""
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0)
    first = registry.on_placed("w", 5, now=1.0)
    second = registry.on_placed("w", 7, now=1.0)
    registry.on_released(first)
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.0)[0].backlog_tokens == 7
    registry.on_report("w", LoadSnapshot(running_tokens=7), 1.2)  # this report counts the second
    registry.on_released(second)  # so its release must not subtract again
    third = registry.on_placed("w", 3, now=1.2)
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.2)[0].backlog_tokens == 10
    registry.on_released(third)
    registry.on_released(third)  # twice: still counted once
    assert registry.candidates(EndpointKind.WORKER, "chat", 1.2)[0].backlog_tokens == 7


def test_requests_placed_since_the_report_count_in_the_load() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0, running=3)
    placed = registry.on_placed("w", 5, now=1.0, prompt_tokens=2)
    registry.on_placed("w", 7, now=1.0, prompt_tokens=3)
    [candidate] = registry.candidates(EndpointKind.WORKER, "chat", 1.0)
    assert (candidate.sequences, candidate.pending_prompt_tokens) == (5, 5)
    registry.on_released(placed)
    [candidate] = registry.candidates(EndpointKind.WORKER, "chat", 1.0)
    assert (candidate.sequences, candidate.pending_prompt_tokens) == (4, 3)
    registry.on_report("w", LoadSnapshot(running=4), 1.2)
    [candidate] = registry.candidates(EndpointKind.WORKER, "chat", 1.2)
    assert (candidate.sequences, candidate.pending_prompt_tokens) == (4, 0)


def test_idle_report_keeps_the_last_step_model() -> None:
    registry = make_registry("w")
    registry.on_info("w", "id-w", (CHAT,))
    report = LoadSnapshot(decode_step_fixed_s=0.05, decode_step_per_sequence_s=0.004, decode_step_batch=6.5)
    registry.on_report("w", report, 0.0)
    registry.on_report("w", LoadSnapshot(), 0.1)
    [candidate] = registry.candidates(EndpointKind.WORKER, "chat", 0.1)
    assert candidate.step == StepModel(fixed_s=0.05, per_sequence_s=0.004, batch=6.5)


def test_throughput_when_full_comes_from_the_step_model_where_measured() -> None:
    registry = make_registry("measured", "rate-only", "new")
    for address in ("measured", "rate-only", "new"):
        registry.on_info(address, f"id-{address}", (CHAT,))
    registry.on_report(
        "measured",
        LoadSnapshot(decode_tokens_per_s=20.0, decode_step_fixed_s=0.04, decode_step_per_sequence_s=0.002),
        0.0,
    )
    registry.on_report("rate-only", LoadSnapshot(decode_tokens_per_s=30.0), 0.0)
    registry.on_report("new", LoadSnapshot(), 0.0)
    model = LoadModel(Priors(decode_tokens_per_s=10.0), streams_per_worker=16, headroom_share=0.5)
    cluster = model.cluster(registry.loads(EndpointKind.WORKER, 0.0))
    # 16 sequences a step of 0.04 + 16 * 0.002 s; the reported rate; the prior.
    assert (cluster.workers, cluster.slots, cluster.headroom) == (3, 48, 24)
    assert cluster.tokens_per_s == pytest.approx(16 / 0.072 + 30.0 + 10.0)
    registry.on_down("new", "gone")
    assert model.cluster(registry.loads(EndpointKind.WORKER, 0.0)).workers == 2


def test_idle_report_keeps_the_last_measured_speed() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0, decode_tokens_per_s=30)
    registry.on_report("w", LoadSnapshot(), 0.1)  # idle: nothing measured in this interval
    assert registry.candidates(EndpointKind.WORKER, "chat", 0.1)[0].decode_tokens_per_s == 30.0


def test_repeated_errors_eject_until_a_probe_succeeds() -> None:
    registry = Registry(stale_after_s=100.0, eject_after_errors=2, eject_s=5.0)
    registry.add("w", EndpointKind.WORKER)
    bring_up(registry, "w", now=0.0)
    assert not registry.on_error("w", 1.0)
    assert registry.is_usable("w", 1.0)
    assert registry.on_error("w", 1.0)
    assert not registry.is_usable("w", 5.9)
    assert detail(registry, "w", 2.0) == "ejected after 2 failed requests for 4.0s"
    assert registry.is_usable("w", 6.0)  # probed back in
    assert registry.on_error("w", 6.0)  # the probe failed: out again at once
    assert not registry.is_usable("w", 10.0)
    registry.on_success("w")
    assert registry.is_usable("w", 10.0)
    assert not registry.on_error("w", 10.0)  # the count starts over


def test_report_models_replace_info_models() -> None:
    registry = make_registry("w")
    bring_up(registry, "w", now=0.0)
    newer = ModelSpec("chat-v2", ModelKind.CHAT)
    registry.on_report("w", LoadSnapshot(models=(newer,)), 1.0)
    assert registry.catalog() == [newer]


def test_catalog_is_ordered_deduplicated_and_conservative_on_context() -> None:
    registry = make_registry("w1", "w2", embedders=("e1",))
    small = ModelSpec("chat", ModelKind.CHAT, context_length=1024)
    bring_up(registry, "w1", now=0.0, models=(CHAT, ModelSpec("b", ModelKind.CHAT)))
    bring_up(registry, "w2", now=0.0, models=(small,))
    bring_up(registry, "e1", now=0.0, models=(EMBED,))
    assert [m.id for m in registry.catalog()] == ["chat", "b", "embed"]
    assert registry.catalog(ModelKind.CHAT)[0].context_length == 1024
    assert registry.catalog(ModelKind.EMBEDDING) == [EMBED]


def test_describe_names_each_endpoint_and_why() -> None:
    registry = make_registry("w1", "w2")
    bring_up(registry, "w1", now=0.0)
    registry.on_down("w2", "refused")
    assert registry.describe(EndpointKind.WORKER, 5.0) == (
        "w1 stale: last load report 5.0s ago; w2 down: refused"
    )
    assert registry.describe(EndpointKind.EMBEDDER, 5.0) == "no embedder configured"


def waiting(registry: Registry, now: float) -> int:
    return sum(e.waiting_tokens for e in registry.loads(EndpointKind.WORKER, now))


def test_waiting_tokens_count_only_a_queue_that_lasts_the_window() -> None:
    registry = Registry(stale_after_s=STALE_S, waiting_window_s=1.0)
    registry.add("a", EndpointKind.WORKER)
    registry.add("b", EndpointKind.WORKER)
    bring_up(registry, "a", 0.0)
    bring_up(registry, "b", 0.0, waiting_tokens=50)
    registry.on_report("a", LoadSnapshot(waiting_tokens=900), 0.5)  # a burst being admitted
    assert waiting(registry, 0.5) == 50  # a's 0 is still in its window
    registry.on_report("a", LoadSnapshot(waiting_tokens=700), 1.2)
    registry.on_report("b", LoadSnapshot(waiting_tokens=80), 1.2)
    # a's queue lasted (900 then 700 within the window); b's earlier 50 left the window.
    assert waiting(registry, 1.2) == 700 + 80
    registry.on_report("a", LoadSnapshot(waiting_tokens=0), 1.3)
    assert waiting(registry, 1.3) == 0 + 80

    unwindowed = make_registry("a")
    bring_up(unwindowed, "a", 0.0, waiting_tokens=900)
    unwindowed.on_report("a", LoadSnapshot(waiting_tokens=80), 0.1)
    assert waiting(unwindowed, 0.1) == 80  # no window: the latest report
