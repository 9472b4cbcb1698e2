"""`infermesh`: command-line client of the router: chat, embed, status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_SHOWN_VALUES = 6
# Messages gRPC itself gives when no connection could be made at all, as opposed to
# UNAVAILABLE answered by the router (e.g. no healthy worker).
_TRANSPORT_FAILURES = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "connection refused",
)


class _Stop(Exception):
    """Ends the interactive loop."""


def _stub(channel: grpc.Channel) -> router_pb2_grpc.InferenceStub:
    return router_pb2_grpc.InferenceStub(channel)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- chat ------------------------------------------------------------------------------------


def _sampling(args: argparse.Namespace) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams()
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    return sampling


def _generate(
    stub: router_pb2_grpc.InferenceStub,
    args: argparse.Namespace,
    messages: Sequence[common_pb2.ChatMessage],
    session_id: str | None,
) -> str:
    """Stream one reply to stdout as it arrives; return its text."""
    req = router_pb2.GenerateRequest(model=args.model or "", messages=messages, sampling=_sampling(args))
    if session_id:
        req.session_id = session_id
    if args.max_tokens is not None:
        req.max_tokens = args.max_tokens
    parts: list[str] = []
    stream: Iterator[router_pb2.GenerateResponse] = stub.Generate(req, timeout=args.timeout)
    for resp in stream:
        for note in resp.degraded:
            _err(f"note: {note.reason}")
        if resp.text:
            sys.stdout.write(resp.text)
            sys.stdout.flush()
            parts.append(resp.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def _new_session(stub: router_pb2_grpc.InferenceStub, args: argparse.Namespace) -> str:
    session = stub.CreateSession(
        router_pb2.CreateSessionRequest(user_id=args.user, model=args.model or ""), timeout=args.timeout
    )
    _err(f"session: {session.session_id}")
    return str(session.session_id)


def _turn(role: common_pb2.Role, content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content)


def cmd_chat(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = _stub(channel)
    system = [_turn(common_pb2.ROLE_SYSTEM, args.system)] if args.system else []
    if args.prompt is not None:
        session_id = _new_session(stub, args) if args.new_session else args.session
        _generate(stub, args, [*system, _turn(common_pb2.ROLE_USER, args.prompt)], session_id)
        return 0
    return _interactive(stub, args, system)


def _interactive(
    stub: router_pb2_grpc.InferenceStub, args: argparse.Namespace, system: list[common_pb2.ChatMessage]
) -> int:
    """Chat until EOF or /exit, keeping the conversation in a session.

    Without a session service on the router, the history is kept here and resent each turn.
    """
    session_id = args.session
    local: list[common_pb2.ChatMessage] | None = None
    if not session_id:
        try:
            session_id = _new_session(stub, args)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                raise
            _err("note: the router has no session service; keeping the conversation locally")
            local = []
    pending = system
    _err("type a message, /exit or Ctrl-D to leave")
    while True:
        try:
            line = _read_line()
        except _Stop:
            return 0
        if not line:
            continue
        user = _turn(common_pb2.ROLE_USER, line)
        sent = [*(local or []), *pending, user]
        reply = _generate(stub, args, sent, session_id if local is None else None)
        if local is not None:
            local = [*sent, _turn(common_pb2.ROLE_ASSISTANT, reply)]
        pending = []


def _read_line() -> str:
    try:
        line = input("> ").strip()
    except EOFError:
        raise _Stop from None
    if line in ("/exit", "/quit"):
        raise _Stop
    return line


# --- embed -----------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace, channel: grpc.Channel) -> int:
    req = router_pb2.EmbedRequest(model=args.model or "", inputs=args.texts)
    resp = _stub(channel).Embed(req, timeout=args.timeout)
    if args.json:
        out = {
            "model": resp.model,
            "embeddings": [
                {"values": list(e.values), "truncated": e.truncated, "token_count": e.token_count}
                for e in resp.embeddings
            ],
        }
        print(json.dumps(out))
        return 0
    print(f"model: {resp.model}")
    for i, e in enumerate(resp.embeddings):
        head = " ".join(f"{v:+.4f}" for v in e.values[:_SHOWN_VALUES])
        more = " …" if len(e.values) > _SHOWN_VALUES else ""
        cut = " (truncated)" if e.truncated else ""
        print(f"[{i}] dim={len(e.values)} tokens={e.token_count}{cut}: {head}{more}")
    return 0


# --- status ----------------------------------------------------------------------------------

_KINDS = {
    router_pb2.ENDPOINT_KIND_WORKER: "worker",
    router_pb2.ENDPOINT_KIND_EMBEDDER: "embedder",
    router_pb2.ENDPOINT_KIND_SESSION: "session",
}


def cmd_status(args: argparse.Namespace, channel: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    serving = health.status == health_pb2.HealthCheckResponse.SERVING
    status = _stub(channel).GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=args.timeout)
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    print(f"router {args.address} ({status.router_id}): {state}")
    table = Table(
        "kind", "address", "healthy", "running", "waiting", "kv free", "tok/s", "report age", "detail"
    )
    for ep in status.endpoints:
        has_load = ep.HasField("load")
        load = ep.load
        table.add_row(
            _KINDS.get(ep.kind, "?"),
            ep.address,
            "yes" if ep.healthy else "no",
            str(load.running) if has_load else "-",
            str(load.waiting) if has_load else "-",
            f"{load.kv_blocks_free}/{load.kv_blocks_total}" if has_load and load.kv_blocks_total else "-",
            f"{load.decode_tokens_per_s or load.items_per_s:.1f}" if has_load else "-",
            f"{ep.report_age_ms} ms" if ep.report_age_ms else "-",
            ep.detail,
        )
    # Wide when piped, so addresses and details are not wrapped mid-word.
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)
    return 0 if serving else 1


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infermesh", description="Talk to an infermesh router.")
    parser.add_argument(
        "--address",
        default=os.environ.get("INFERMESH_ADDRESS") or DEFAULT_ADDRESS,
        help="router host:port (default: $INFERMESH_ADDRESS or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for each call")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="stream a reply; without a prompt, chat interactively")
    chat.add_argument("prompt", nargs="?", help="the message; omit it for an interactive session")
    group = chat.add_mutually_exclusive_group()
    group.add_argument("--session", help="continue this session")
    group.add_argument("--new-session", action="store_true", help="create a session (its id goes to stderr)")
    chat.add_argument("--model", help="catalog model id (default: the router's default chat model)")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument(
        "--user",
        default=os.environ.get("USER") or "cli",
        help="user id recorded on new sessions (default: $USER)",
    )
    chat.set_defaults(func=cmd_chat)

    embed = sub.add_parser("embed", help="embed texts and show the vectors")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", help="catalog model id (default: the router's default embedding model)")
    embed.add_argument("--json", action="store_true", help="print the full vectors as JSON")
    embed.set_defaults(func=cmd_embed)

    status = sub.add_parser("status", help="router health and cluster status")
    status.set_defaults(func=cmd_status)
    return parser


def describe_error(exc: grpc.RpcError, address: str) -> str:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or ""  # type: ignore[attr-defined]
    if code is grpc.StatusCode.UNAVAILABLE and details.lower().startswith(_TRANSPORT_FAILURES):
        return f"cannot reach infermesh router at {address} — start the mesh with `make up`"
    return f"error: {code.name}: {details}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            code: int = args.func(args, channel)
            return code
    except grpc.RpcError as exc:
        sys.stdout.flush()
        _err(describe_error(exc, args.address))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
