"""The client, the CLI and the health check over TLS and mutual TLS to a router that asks for
client certificates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infermesh import cli
from infermesh.client import AsyncClient, ChannelSettings, ConnectionFailed, InfermeshError
from services.common import healthcheck
from services.common.server import GrpcServer
from services.common.tls import make_ca, make_cert
from tests.integration.router.helpers import start_router


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    ca = make_ca(folder)
    for name in ("router", "client"):
        make_cert(folder, name, ca)
    make_cert(folder, "stranger", make_ca(folder, "other-ca"))
    return folder


@pytest.fixture
async def router(certs: Path) -> AsyncIterator[GrpcServer]:
    server = await start_router(
        tls_cert_file=str(certs / "router.crt"),
        tls_key_file=str(certs / "router.key"),
        tls_ca_file=str(certs / "ca.crt"),
        tls_require_client_cert=True,
    )
    yield server
    await server.stop(0)


def files(certs: Path, client: str) -> dict[str, str]:
    return {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / f"{client}.crt"),
        "key_file": str(certs / f"{client}.key"),
    }


async def test_client_with_its_certificate_gets_in_and_others_do_not(router: GrpcServer, certs: Path) -> None:
    settings = ChannelSettings.from_files(router.address, **files(certs, "client"))
    async with AsyncClient(settings=settings, timeout=5) as client:
        assert await client.health() == "SERVING"
        assert (await client.list_models()).models == ()

    refused = [
        ChannelSettings(router.address),  # plaintext
        ChannelSettings.from_files(router.address, ca_file=str(certs / "ca.crt")),  # no client cert
        ChannelSettings.from_files(router.address, **files(certs, "stranger")),  # another CA
    ]
    for settings in refused:
        async with AsyncClient(settings=settings, timeout=5) as client:
            with pytest.raises(InfermeshError) as caught:
                await client.list_models()
        assert isinstance(caught.value, ConnectionFailed) and caught.value.tls_mismatch


async def test_cli_and_health_check_over_mutual_tls(
    router: GrpcServer, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt")]
    tls += ["--tls-key", str(certs / "client.key")]
    code = await asyncio.to_thread(cli.main, ["--address", router.address, *tls, "status"])
    assert code == 0
    assert f"router {router.address}" in capsys.readouterr().out
    assert await asyncio.to_thread(healthcheck.main, [router.address, *tls]) == 0
    assert capsys.readouterr().out == f"{router.address}: SERVING\n"
    assert await asyncio.to_thread(healthcheck.main, [router.address, "--timeout", "2"]) == 1
    capsys.readouterr()
    # Plaintext to a TLS router: the CLI says what is likely wrong.
    assert await asyncio.to_thread(cli.main, ["--address", router.address, "--timeout", "5", "status"]) == 1
    assert capsys.readouterr().err == (
        f"the router at {router.address} closed the connection while it was set up — if it serves TLS, "
        "pass --tls-ca (and --tls-cert/--tls-key when it asks for a client certificate)\n"
    )
