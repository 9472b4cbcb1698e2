"""`infermesh keys create|revoke|list`: API keys through the router's Admin service (admin role)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from infermesh.client import Client
from infermesh.client.errors import from_rpc_error
from infermesh.router.v1 import router_pb2, router_pb2_grpc


def _admin(client: Client, call: Callable[[router_pb2_grpc.AdminStub], Any]) -> Any:
    # The client's channel carries the caller's API key (see infermesh.client.channel).
    try:
        return call(router_pb2_grpc.AdminStub(client.channel))
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, client.settings.address) from None


def cmd_create(args: argparse.Namespace, client: Client) -> int:
    request = router_pb2.CreateApiKeyRequest(tenant=args.tenant, role=args.role, description=args.description)
    resp = _admin(client, lambda stub: stub.CreateApiKey(request, timeout=args.timeout))
    print(resp.api_key)
    print(
        f"key {resp.key_prefix} for tenant {args.tenant!r}, role {args.role!r}: "
        "shown this once; only a salted hash is stored",
        file=sys.stderr,
    )
    return 0


def cmd_revoke(args: argparse.Namespace, client: Client) -> int:
    request = router_pb2.RevokeApiKeyRequest(key_prefix=args.key_prefix)
    _admin(client, lambda stub: stub.RevokeApiKey(request, timeout=args.timeout))
    print(f"key {args.key_prefix} revoked")
    return 0


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    request = router_pb2.ListApiKeysRequest(tenant=args.tenant or "")
    resp = _admin(client, lambda stub: stub.ListApiKeys(request, timeout=args.timeout))
    table = Table("prefix", "tenant", "role", "created", "revoked", "description")
    for key in resp.keys:
        created = (
            key.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M") if key.HasField("created_at") else "-"
        )
        table.add_row(
            key.key_prefix, key.tenant, key.role, created, "yes" if key.revoked else "", key.description
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, revoke and list API keys (admin)")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    create = commands.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", required=True, help="admin, user, batch, reader or one from router.roles")
    create.add_argument("--description", default="")
    create.set_defaults(func=cmd_create)
    revoke = commands.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("key_prefix")
    revoke.set_defaults(func=cmd_revoke)
    listing = commands.add_parser("list", help="keys (prefix, tenant, role), never the keys themselves")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=cmd_list)
