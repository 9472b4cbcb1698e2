"""Quota arithmetic: windows, refusals with pushback, local counters, per-tenant overrides."""

from __future__ import annotations

import pytest

from services.router.core.quotas import (
    BUDGET,
    REQUESTS,
    TOKENS,
    LocalCounters,
    QuotaLimits,
    QuotaSpecError,
    build_limits,
    decide,
    parse_override,
    windows,
)

NOW = 60 * 28_333_334 + 30.5  # 30.5 s into a minute


def test_only_limited_kinds_get_windows():
    assert windows("t", QuotaLimits(), 100, NOW) == []
    ws = windows("t", QuotaLimits(requests_per_s=5, tokens_per_minute=1000), 100, NOW)
    assert [(w.kind, w.add, w.limit) for w in ws] == [(REQUESTS, 1, 5), (TOKENS, 100, 1000)]
    assert ws[1].ends_at - NOW == pytest.approx(29.5)


def test_a_request_that_would_pass_the_limit_is_refused_with_the_time_to_the_next_window():
    limits = QuotaLimits(tokens_per_minute=1000)
    counters = LocalCounters()
    assert counters.reserve(windows("t", limits, 600, NOW), NOW) is None
    refusal = counters.reserve(windows("t", limits, 500, NOW), NOW)
    assert refusal is not None and refusal.kind == TOKENS
    assert (refusal.used, refusal.asked, refusal.retry_after_ms) == (600, 500, 29_500)
    assert "tokens_per_minute=1000" in refusal.message("t")
    # The refused request took nothing; a smaller one still fits.
    assert counters.reserve(windows("t", limits, 400, NOW), NOW) is None
    # The next minute starts from zero.
    assert counters.reserve(windows("t", limits, 1000, NOW + 30), NOW + 30) is None


def test_settling_refunds_unused_tokens_and_usage_never_passes_the_limit():
    limits = QuotaLimits(tokens_per_minute=1000, token_budget=1500)
    counters = LocalCounters()
    admitted = 0
    for _ in range(20):
        ws = windows("t", limits, 300, NOW)  # prompt + max_tokens reserved
        if counters.reserve(ws, NOW) is None:
            admitted += 1
            counters.adjust([w.key for w in ws], 120 - 300)  # used 120 of them
    assert admitted == 6  # after 6 x 120 = 720 used, 720 + 300 reserved would pass 1000
    assert max(counters.counts.values()) <= 1000


def test_the_budget_refuses_across_minutes():
    limits = QuotaLimits(token_budget=1000, budget_period_s=3600)
    counters = LocalCounters()
    assert counters.reserve(windows("t", limits, 900, NOW), NOW) is None
    refusal = counters.reserve(windows("t", limits, 200, NOW + 120), NOW + 120)
    assert refusal is not None and refusal.kind == BUDGET


def test_a_request_bigger_than_the_limit_says_it_can_never_fit():
    refusal = decide({}, windows("t", QuotaLimits(tokens_per_minute=100), 500, NOW), NOW)
    assert refusal is not None and "can never fit" in refusal.message("t")


def test_tenants_count_apart():
    limits = QuotaLimits(requests_per_s=1)
    counters = LocalCounters()
    assert counters.reserve(windows("a", limits, 1, NOW), NOW) is None
    assert counters.reserve(windows("b", limits, 1, NOW), NOW) is None
    assert counters.reserve(windows("a", limits, 1, NOW), NOW) is not None


def test_overrides():
    base = QuotaLimits(tokens_per_minute=1000)
    tenant, limits = parse_override("acme:token_budget=5000:requests_per_s=3", base)
    assert tenant == "acme" and limits == QuotaLimits(3, 1000, 5000)
    assert build_limits(base, ["b:tokens_per_minute=0"])["b"].enabled is False
    for bad in ("", ":x=1", "a:tokens=1", "a:token_budget=x", "a:budget_period_s=0"):
        with pytest.raises(QuotaSpecError):
            parse_override(bad, base)
