"""The model catalog: models described in a file the operator writes (id, tier, context
length, hardware needs, description), merged with what the workers report, and the choice
behind `model: "auto"`.

Pure: plain values in, plain values out; the file is TOML with one `[[model]]` table each:

    [[model]]
    id = "smollm2-135m-instruct"
    tier = "small"                 # small < medium < large
    context_length = 8192
    device = "cpu"                 # cpu, cuda, mps; absent = any
    min_memory_gb = 1
    description = "Fast answers to short questions."
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from services.router.core.domain import ModelKind, ModelSpec

TIERS = ("small", "medium", "large")
DEVICES = ("cpu", "cuda", "mps")
AUTO = "auto"
_GIB = 1 << 30
_FIELDS = {"id", "kind", "tier", "context_length", "device", "min_memory_gb", "description", "family"}


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the entry and field."""


def parse_catalog(text: str, origin: str = "catalog") -> tuple[ModelSpec, ...]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: not valid TOML ({exc})") from None
    entries = data.get("model", [])
    if not isinstance(entries, list):
        raise CatalogError(f"{origin}: `model` must be an array of tables ([[model]])")
    models = tuple(_entry(f"{origin}: model[{i}]", e) for i, e in enumerate(entries))
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise CatalogError(f"{origin}: model ids must be distinct, got {ids}")
    return models


def load_catalog(path: str) -> tuple[ModelSpec, ...]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read ({exc.strerror})") from None
    return parse_catalog(text, path)


def _entry(where: str, entry: Any) -> ModelSpec:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a table")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(_FIELDS)})")
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id or model_id.startswith(AUTO):
        raise CatalogError(f"{where}.id={model_id!r}: must be a non-empty name not starting with {AUTO!r}")
    kind = _choice(f"{where}.kind", entry.get("kind", "chat"), ("chat", "embedding"))
    tier = _choice(f"{where}.tier", entry.get("tier", ""), ("", *TIERS))
    device = _choice(f"{where}.device", entry.get("device", ""), ("", *DEVICES))
    context = entry.get("context_length", 0)
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise CatalogError(f"{where}.context_length={context!r}: must be an integer >= 0")
    memory = entry.get("min_memory_gb", 0)
    if not isinstance(memory, int | float) or isinstance(memory, bool) or memory < 0:
        raise CatalogError(f"{where}.min_memory_gb={memory!r}: must be a number >= 0")
    texts = {k: entry.get(k, "") for k in ("description", "family")}
    for key, value in texts.items():
        if not isinstance(value, str):
            raise CatalogError(f"{where}.{key}={value!r}: must be a string")
    return ModelSpec(
        id=model_id,
        kind=ModelKind.CHAT if kind == "chat" else ModelKind.EMBEDDING,
        context_length=context,
        tier=tier,
        device_type=device,
        min_memory_bytes=round(memory * _GIB),
        **texts,
    )


def _choice(where: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise CatalogError(f"{where}={value!r}: must be one of {[a for a in allowed if a]}")
    return str(value)


def merge(reported: Iterable[ModelSpec], configured: Sequence[ModelSpec]) -> list[ModelSpec]:
    """Configured models first (filled in from the workers' reports where the file is silent,
    the smaller context where both say), then models only the workers know."""
    by_id = {m.id: m for m in reported}
    out = []
    for entry in configured:
        seen = by_id.pop(entry.id, None)
        if seen is not None:
            context = min((c for c in (entry.context_length, seen.context_length) if c), default=0)
            changes = {
                f.name: getattr(seen, f.name)
                for f in dataclasses.fields(ModelSpec)
                if not getattr(entry, f.name) and getattr(seen, f.name)
            }
            entry = dataclasses.replace(entry, **{**changes, "context_length": context})
        out.append(entry)
    out.extend(by_id.values())
    return out


def pick_auto(
    quality: str,
    prompt_tokens: int,
    max_tokens: int,
    models: Sequence[ModelSpec],
    long_prompt_tokens: Sequence[int],
) -> ModelSpec | None:
    """The model behind `auto` (or `auto:<tier>`): the smallest tier at least as large as both
    the asked quality and what the prompt's length calls for (`long_prompt_tokens`: prompt
    tokens from which medium, then large, is called for) whose context holds the request;
    failing that, the largest tier that holds it. None when no tiered chat model does."""
    needed = prompt_tokens + max_tokens
    fits = [
        m
        for m in models
        if m.kind is ModelKind.CHAT
        and m.tier in TIERS
        and (not m.context_length or m.context_length >= needed)
    ]
    if not fits:
        return None
    by_length = sum(1 for t in long_prompt_tokens if prompt_tokens >= t)
    wanted = max(TIERS.index(quality) if quality else 0, min(by_length, len(TIERS) - 1))
    rank = {m.id: TIERS.index(m.tier) for m in fits}
    at_least = [m for m in fits if rank[m.id] >= wanted]
    if at_least:
        return min(at_least, key=lambda m: rank[m.id])
    return max(fits, key=lambda m: rank[m.id])


def _holds(model: ModelSpec, tokens: int) -> bool:
    return not model.context_length or model.context_length >= tokens


def auto_quality(model: str) -> str | None:
    """ "" for `auto`, the tier for `auto:<tier>`; None when `model` is not an auto request."""
    if model == AUTO:
        return ""
    prefix, sep, tier = model.partition(":")
    if prefix != AUTO or not sep:
        return None
    return tier
