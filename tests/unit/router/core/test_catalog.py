"""Model catalog: the file's entries checked field by field, merged with what workers report,
and the model behind `auto`."""

from __future__ import annotations

import pytest

from services.router.core.catalog import CatalogError, auto_quality, merge, parse_catalog, pick_auto
from services.router.core.domain import ModelKind, ModelSpec

FILE = """
[[model]]
id = "big"
tier = "large"
context_length = 8192
device = "cuda"
min_memory_gb = 1.5
description = "Careful answers."

[[model]]
id = "embed"
kind = "embedding"
"""


def chat(model_id: str, tier: str, context_length: int = 4096) -> ModelSpec:
    return ModelSpec(model_id, ModelKind.CHAT, context_length=context_length, tier=tier)


def test_entries_are_read_with_their_hardware_needs() -> None:
    big, embed = parse_catalog(FILE)
    assert big == ModelSpec(
        "big",
        ModelKind.CHAT,
        context_length=8192,
        tier="large",
        description="Careful answers.",
        device_type="cuda",
        min_memory_bytes=int(1.5 * (1 << 30)),
    )
    assert embed.kind is ModelKind.EMBEDDING and embed.tier == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[model]]\nid = 3", "model[0].id=3"),
        ("[[model]]\nid = 'auto'", "not starting with 'auto'"),
        ("[[model]]\nid = 'a'\ntier = 'huge'", "tier='huge': must be one of ['small', 'medium', 'large']"),
        ("[[model]]\nid = 'a'\ndevice = 'tpu'", "model[0].device='tpu'"),
        ("[[model]]\nid = 'a'\ncontext_length = -1", "model[0].context_length=-1"),
        ("[[model]]\nid = 'a'\nmin_memory_gb = 'lots'", "model[0].min_memory_gb='lots'"),
        ("[[model]]\nid = 'a'\ncolour = 'red'", "unknown fields ['colour']"),
        ("[[model]]\nid = 'a'\n[[model]]\nid = 'a'", "must be distinct"),
        ("model = 3", "array of tables"),
        ("[[model]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_entries_name_the_field(text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_catalog(text)


def test_merge_fills_what_the_file_leaves_out_and_keeps_the_smaller_context() -> None:
    configured = [
        ModelSpec("a", ModelKind.CHAT, tier="small", context_length=9000),
        ModelSpec("gone", ModelKind.CHAT),
    ]
    reported = [
        ModelSpec("only-reported", ModelKind.CHAT),
        ModelSpec("a", ModelKind.CHAT, context_length=2048, family="llama", source="a.gguf"),
    ]
    a, gone, extra = merge(reported, configured)
    assert (a.tier, a.context_length, a.family, a.source) == ("small", 2048, "llama", "a.gguf")
    assert gone.id == "gone" and extra.id == "only-reported"


MODELS = [chat("s", "small", 2048), chat("m", "medium", 8192), chat("l", "large", 32768), chat("x", "")]
LONG = [512, 2048]


@pytest.mark.parametrize(
    ("quality", "prompt_tokens", "max_tokens", "picked"),
    [
        ("", 10, 100, "s"),  # short prompt: the smallest tier
        ("", 600, 100, "m"),  # long prompt: medium
        ("", 3000, 100, "l"),  # longer: large
        ("", 1900, 200, "m"),  # would call for medium; holds there
        ("", 400, 2000, "m"),  # small cannot hold 2400 tokens
        ("large", 10, 100, "l"),  # asked quality wins over a short prompt
        ("medium", 3000, 100, "l"),  # the prompt's length wins over a lower asked quality
    ],
)  # fmt: skip
def test_auto_picks_the_smallest_tier_the_prompt_and_quality_call_for(
    quality: str, prompt_tokens: int, max_tokens: int, picked: str
) -> None:
    model = pick_auto(quality, prompt_tokens, max_tokens, MODELS, LONG)
    assert model is not None and model.id == picked


def test_auto_falls_back_to_the_largest_that_holds_it_or_none() -> None:
    only_small = [chat("s", "small", 2048)]
    model = pick_auto("large", 10, 10, only_small, LONG)
    assert model is not None and model.id == "s"
    assert pick_auto("", 5000, 10, only_small, LONG) is None
    assert pick_auto("", 10, 10, [chat("x", "")], LONG) is None


def test_auto_names() -> None:
    assert auto_quality("auto") == ""
    assert auto_quality("auto:large") == "large"
    assert auto_quality("autopilot") is None and auto_quality("m") is None
