"""`infermesh keys ...` and `--api-key` against a router with authentication on."""

from __future__ import annotations

import asyncio

import pytest

from infermesh.cli import main
from tests.integration.security.conftest import SecureMesh

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # The CLI is blocking; the servers run on this event loop.
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_keys_create_list_revoke_through_the_cli(secure_mesh: SecureMesh, capsys):
    admin = ["--address", secure_mesh.router.address, "--api-key", secure_mesh.admin_key, "--timeout", "10"]
    code, out, err = await _cli(capsys, *admin, "keys", "create", "--tenant", "cli-team", "--role", "user")
    assert code == 0, err
    new_key = out.strip()
    prefix = new_key.split("_")[1]
    assert "shown this once" in err and prefix in err

    code, out, _ = await _cli(capsys, *admin, "keys", "list", "--tenant", "cli-team")
    assert code == 0 and prefix in out and new_key not in out

    user = ["--address", secure_mesh.router.address, "--api-key", new_key, "--timeout", "10"]
    code, out, err = await _cli(capsys, *user, "embed", "hello")
    assert code == 0 and "dim=" in out, err
    code, _, err = await _cli(capsys, *user, "status")
    assert code == 1 and "PERMISSION_DENIED" in err and "GetClusterStatus" in err
    code, _, err = await _cli(capsys, *user, "keys", "list")
    assert code == 1 and "PERMISSION_DENIED" in err and "ListApiKeys" in err

    code, out, _ = await _cli(capsys, *admin, "keys", "revoke", prefix)
    assert code == 0 and "revoked" in out
    await asyncio.sleep(0.3)  # past the router's key cache (auth_cache_s=0.2 in these tests)
    code, _, err = await _cli(capsys, *user, "embed", "hello")
    assert code == 1 and "UNAUTHENTICATED" in err


async def test_no_key_is_unauthenticated(secure_mesh: SecureMesh, capsys):
    code, _, err = await _cli(capsys, "--address", secure_mesh.router.address, "--timeout", "10", "status")
    assert code == 1 and "UNAUTHENTICATED" in err and "API key is required" in err
