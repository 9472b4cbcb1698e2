"""A router with a model catalog file: ListModels serves it (descriptions, tiers, hardware
needs, models no worker serves yet), hardware needs filter the workers, and `model: "auto"`
picks the tier the prompt and the asked quality call for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from services.common.config import ConfigError, load_config
from services.router.config import RouterConfig
from tests.integration.router.fakes import FakeWorker, chat_model, start_fake
from tests.integration.router.helpers import chat_request, collect, router_for, wait_healthy

CATALOG = """
[[model]]
id = "tiny"
tier = "small"
description = "Quick answers to short questions."

[[model]]
id = "mid"
tier = "medium"
context_length = 2048

[[model]]
id = "gpu-only"
tier = "large"
device = "cuda"
description = "Needs a GPU."

[[model]]
id = "not-deployed"
tier = "large"
"""


@asynccontextmanager
async def cataloged(tmp_path: Path) -> AsyncIterator[tuple[FakeWorker, Any]]:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    # The fake runs on a CPU: "gpu-only" is served by it but may not be placed there.
    worker = FakeWorker(
        models=[chat_model("tiny", 1024), chat_model("mid", 4096), chat_model("gpu-only", 8192)]
    )
    server = await start_fake(worker)
    try:
        async with router_for([server.address], catalog_file=str(path)) as stub:
            await wait_healthy(stub, {server.address})
            yield worker, stub
    finally:
        await server.stop(0)


async def test_list_models_serves_the_catalog(tmp_path: Path) -> None:
    async with cataloged(tmp_path) as (_, stub):
        listed = await stub.ListModels(router_pb2.ListModelsRequest(), timeout=5)
        models = {m.id: m for m in listed.models}
        assert list(models) == ["tiny", "mid", "gpu-only", "not-deployed"]
        assert models["tiny"].description == "Quick answers to short questions."
        assert models["tiny"].context_length == 1024  # from the worker: the file left it out
        assert models["mid"].context_length == 2048  # the file's, smaller than the worker's
        assert models["gpu-only"].device_type == common_pb2.DEVICE_TYPE_CUDA
        assert [m.tier for m in models.values()] == ["small", "medium", "large", "large"]


async def test_hardware_needs_keep_a_model_off_workers_without_that_device(tmp_path: Path) -> None:
    async with cataloged(tmp_path) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, chat_request("hi", model="gpu-only"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "device cpu is not cuda" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, chat_request("hi", model="not-deployed"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("model", "text", "max_tokens", "picked"),
    [
        ("auto", "hi", 16, "tiny"),
        ("auto", "word " * 600, 16, "mid"),  # about 750 tokens: long enough for medium
        ("auto:medium", "hi", 16, "mid"),
        ("auto", "hi", 1500, "mid"),  # tiny's 1024-token context cannot hold it
    ],
)
async def test_auto_picks_a_served_model_by_prompt_length_and_quality(
    tmp_path: Path, model: str, text: str, max_tokens: int, picked: str
) -> None:
    async with cataloged(tmp_path) as (worker, stub):
        responses = await collect(stub, chat_request(text, model=model, max_tokens=max_tokens), timeout=5)
        assert responses[0].model == picked and worker.requests[-1].model == picked


async def test_auto_with_an_unknown_tier_names_the_choices(tmp_path: Path) -> None:
    async with cataloged(tmp_path) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, chat_request("hi", model="auto:huge"), timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "auto:small, auto:medium, auto:large" in (err.value.details() or "")


async def test_a_bad_catalog_file_stops_the_router_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[model]]\nid = 'x'\ntier = 'huge'\n")
    with pytest.raises(ConfigError, match=r"model\[0\]\.tier='huge'"):
        load_config(RouterConfig, "router", env={}, overrides={"catalog_file": str(path)})
