"""`infermesh`: command-line client of the router: chat, embed, status, batch jobs, drain.

Built on the Python client library (`infermesh.client`), so it retries like any client and
shows the same typed errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infermesh import keys_cli, top
from infermesh.client import (
    BatchItem,
    BatchJob,
    ChannelSettings,
    Client,
    ConnectionFailed,
    InfermeshError,
    Message,
    Role,
)
from infermesh.client.channel import DEFAULT_ADDRESS

_SHOWN_VALUES = 6
_BATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(BatchItem))


class _Stop(Exception):
    """Ends the interactive loop."""


class UsageError(Exception):
    """Bad input to the CLI itself (a malformed batch file, ...)."""


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wide_console(file: Any = None) -> Console:
    out = file or sys.stdout
    # Wide when piped, so addresses and details are not wrapped mid-word.
    return Console(file=out, width=None if out.isatty() else 200)


# --- chat ------------------------------------------------------------------------------------


def _generate(
    client: Client, args: argparse.Namespace, messages: list[Message], session_id: str | None
) -> str:
    """Stream one reply to stdout as it arrives; return its text."""
    options: dict[str, Any] = {"model": args.model or ""}
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if session_id:
        options["session_id"] = session_id
    parts: list[str] = []
    for chunk in client.stream(messages, **options):
        for note in chunk.degraded:
            _err(f"note: {note.reason}")
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            parts.append(chunk.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def _new_session(client: Client, args: argparse.Namespace) -> str:
    session = client.create_session(args.user, model=args.model or "")
    _err(f"session: {session.session_id}")
    return session.session_id


def cmd_chat(args: argparse.Namespace, client: Client) -> int:
    system = [Message(Role.SYSTEM, args.system)] if args.system else []
    if args.prompt is not None:
        session_id = _new_session(client, args) if args.new_session else args.session
        _generate(client, args, [*system, Message(Role.USER, args.prompt)], session_id)
        return 0
    return _interactive(client, args, system)


def _interactive(client: Client, args: argparse.Namespace, system: list[Message]) -> int:
    """Chat until EOF or /exit, keeping the conversation in a session.

    Without a session service on the router, the history is kept here and resent each turn.
    """
    session_id = args.session
    local: list[Message] | None = None
    if not session_id:
        try:
            session_id = _new_session(client, args)
        except InfermeshError as exc:
            if exc.code.name != "FAILED_PRECONDITION":
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
        sent = [*(local or []), *pending, Message(Role.USER, line)]
        reply = _generate(client, args, sent, session_id if local is None else None)
        if local is not None:
            local = [*sent, Message(Role.ASSISTANT, reply)]
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


def cmd_embed(args: argparse.Namespace, client: Client) -> int:
    resp = client.embed(args.texts, model=args.model or "")
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


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    state = client.health()
    status = client.cluster_status()
    print(f"router {args.address} ({status.router_id}): {state}")
    table = Table(
        "kind", "address", "healthy", "running", "waiting", "kv free", "tok/s", "report age", "detail"
    )
    for ep in status.endpoints:
        table.add_row(
            ep.kind,
            ep.address,
            "yes" if ep.healthy else "no",
            str(ep.running) if ep.has_load else "-",
            str(ep.waiting) if ep.has_load else "-",
            f"{ep.kv_blocks_free}/{ep.kv_blocks_total}" if ep.kv_blocks_total else "-",
            f"{ep.tokens_per_s:.1f}" if ep.has_load else "-",
            f"{ep.report_age_ms} ms" if ep.report_age_ms else "-",
            ep.detail,
        )
    _wide_console().print(table)
    return 0 if state == "SERVING" else 1


def cmd_top(args: argparse.Namespace, client: Client) -> int:
    return top.run(
        args.address,
        metrics_address=args.metrics,
        api_key=args.api_key,
        interval=args.interval,
        once=args.once,
        timeout=args.timeout or 5.0,
    )


# --- batch jobs ------------------------------------------------------------------------------


def read_batch_file(path: Path) -> list[BatchItem]:
    """One request per line: {"custom_id": ..., "messages": [{"role", "content"}] or "prompt",
    and optionally model, max_tokens, temperature, top_p, top_k, seed, stop}."""
    items: list[BatchItem] = []
    try:
        lines = (sys.stdin.read() if str(path) == "-" else path.read_text()).splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}:{number}: must be a JSON object")
        unknown = sorted(set(data) - _BATCH_FIELDS)
        if unknown:
            raise UsageError(
                f"{path}:{number}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_BATCH_FIELDS))})"
            )
        data.setdefault("custom_id", str(number))
        if isinstance(data.get("messages"), str):
            data["messages"] = [data["messages"]]
        data["stop"] = tuple(data.get("stop", ()))
        items.append(BatchItem(**data))
    if not items:
        raise UsageError(f"{path}: no requests in the file")
    return items


def _job_line(job: BatchJob) -> str:
    name = f" ({job.display_name})" if job.display_name else ""
    return f"{job.batch_id}{name}: {job.state.value}, {job.completed}/{job.total} done, {job.failed} failed"


def _watch(client: Client, job: BatchJob, interval_s: float) -> BatchJob:
    """Poll the job with a progress bar (on stderr) until it ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
        task = progress.add_task(job.state.value, total=job.total, failed=job.failed)
        while True:
            progress.update(task, completed=job.processed, description=job.state.value, failed=job.failed)
            if job.done:
                return job
            time.sleep(interval_s)
            job = client.get_batch(job.batch_id)


def cmd_batch_submit(args: argparse.Namespace, client: Client) -> int:
    items = read_batch_file(Path(args.file))
    name = args.name or ("stdin" if args.file == "-" else Path(args.file).name)
    job = client.submit_batch(items, display_name=name)
    print(f"batch {job.batch_id}: {job.total} requests submitted")
    if args.no_wait:
        return 0
    try:
        job = _watch(client, job, args.interval)
    except KeyboardInterrupt:
        _err(f"still running on the router; see `infermesh batch status {job.batch_id}`")
        return 130
    print(_job_line(job))
    if args.output:
        _write_results(client, job.batch_id, args.output)
    return 0 if job.state.value == "succeeded" else 1


def cmd_batch_status(args: argparse.Namespace, client: Client) -> int:
    if args.batch_id:
        job = client.get_batch(args.batch_id)
        if args.watch:
            job = _watch(client, job, args.interval)
        print(_job_line(job))
        return 0
    jobs, _ = client.list_batches(page_size=args.limit)
    table = Table("batch", "name", "state", "done", "failed", "total", "created")
    for j in jobs:
        created = j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-"
        table.add_row(
            j.batch_id, j.display_name, j.state.value, str(j.completed), str(j.failed), str(j.total), created
        )
    _wide_console().print(table)
    return 0


def _result_lines(client: Client, batch_id: str) -> Iterator[str]:
    for r in client.batch_results(batch_id):
        out: dict[str, Any] = {"custom_id": r.custom_id, "index": r.index}
        if r.ok:
            out |= {
                "text": r.text,
                "finish_reason": r.finish_reason.value,
                "usage": {
                    "prompt_tokens": r.usage.prompt_tokens,
                    "completion_tokens": r.usage.completion_tokens,
                },
            }
        else:
            out["error"] = {"code": r.error_code, "message": r.error_message}
        yield json.dumps(out, ensure_ascii=False)


def _write_results(client: Client, batch_id: str, output: str) -> None:
    with open(output, "w") as f:
        count = sum(1 for line in _result_lines(client, batch_id) if f.write(line + "\n"))
    _err(f"{count} results written to {output}")


def cmd_batch_results(args: argparse.Namespace, client: Client) -> int:
    if args.output:
        _write_results(client, args.batch_id, args.output)
        return 0
    for line in _result_lines(client, args.batch_id):
        print(line)
    return 0


def cmd_batch_cancel(args: argparse.Namespace, client: Client) -> int:
    print(_job_line(client.cancel_batch(args.batch_id)))
    return 0


# --- drain -----------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace, client: Client) -> int:
    client.drain(args.endpoint)
    print(f"{args.endpoint}: draining (no new requests; in-flight ones finish)")
    return 0


# --- entry point -----------------------------------------------------------------------------


def _add_batch(sub: Any) -> None:
    batch = sub.add_parser("batch", help="offline batch jobs at BATCH priority")
    jobs = batch.add_subparsers(dest="batch_command", required=True)

    submit = jobs.add_parser("submit", help="submit a JSONL file of requests and follow its progress")
    submit.add_argument(
        "file", help="one JSON request per line (custom_id, messages or prompt, ...); - reads stdin"
    )
    submit.add_argument("--name", help="display name (default: the file name)")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return")
    submit.add_argument("-o", "--output", help="once it ends, write the results (JSON lines) to this file")
    submit.add_argument("--interval", type=float, default=1.0, help="seconds between progress polls")
    submit.set_defaults(func=cmd_batch_submit)

    status = jobs.add_parser("status", help="one job's progress, or a table of recent jobs")
    status.add_argument("batch_id", nargs="?")
    status.add_argument("--watch", action="store_true", help="follow with a progress bar until it ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between progress polls")
    status.add_argument("--limit", type=int, default=20, help="jobs listed without a batch id")
    status.set_defaults(func=cmd_batch_status)

    results = jobs.add_parser("results", help="results as JSON lines, in request order")
    results.add_argument("batch_id")
    results.add_argument("-o", "--output", help="write to this file instead of stdout")
    results.set_defaults(func=cmd_batch_results)

    cancel = jobs.add_parser("cancel", help="stop a job; finished results are kept")
    cancel.add_argument("batch_id")
    cancel.set_defaults(func=cmd_batch_cancel)


# Connection settings that may also come from the environment: flag, variable, what it is.
_CONNECTION_FLAGS = (
    ("--api-key", "INFERMESH_API_KEY", "API key sent with every call"),
    ("--tls-ca", "INFERMESH_TLS_CA_FILE", "CA certificate (PEM) that signed the router's: talk TLS"),
    ("--tls-cert", "INFERMESH_TLS_CERT_FILE", "client certificate (PEM) for mutual TLS"),
    ("--tls-key", "INFERMESH_TLS_KEY_FILE", "private key of --tls-cert"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infermesh", description="Talk to an infermesh router.")
    parser.add_argument(
        "--address",
        default=os.environ.get("INFERMESH_ADDRESS") or DEFAULT_ADDRESS,
        help="router host:port (default: $INFERMESH_ADDRESS or %(default)s)",
    )
    for flag, env, what in _CONNECTION_FLAGS:
        parser.add_argument(flag, default=os.environ.get(env) or None, help=f"{what} (default: ${env})")
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

    top_cmd = sub.add_parser("top", help="live view: endpoints, KV usage, queues, degradation, failovers")
    top_cmd.add_argument(
        "--metrics",
        default=os.environ.get("INFERMESH_METRICS_ADDRESS") or None,
        help="host:port of the router's /metrics, for degradation and failover counts "
        "(default: $INFERMESH_METRICS_ADDRESS; `make up` serves it on 127.0.0.1:9451)",
    )
    top_cmd.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top_cmd.add_argument("--once", action="store_true", help="print one frame and exit")
    top_cmd.set_defaults(func=cmd_top)

    _add_batch(sub)

    drain = sub.add_parser("drain", help="stop routing new requests to a worker; its streams finish (admin)")
    drain.add_argument("endpoint", help="host:port of the endpoint, as `infermesh status` lists it")
    drain.set_defaults(func=cmd_drain)

    keys_cli.add_parser(sub)
    return parser


def describe_error(exc: InfermeshError, address: str) -> str:
    if isinstance(exc, ConnectionFailed) and exc.tls_mismatch:
        return (
            f"the router at {address} closed the connection while it was set up — if it serves TLS, "
            "pass --tls-ca (and --tls-cert/--tls-key when it asks for a client certificate)"
        )
    if isinstance(exc, ConnectionFailed):
        return f"cannot reach infermesh router at {address} — start the mesh with `make up`"
    return f"error: {exc.code.name}: {exc.details}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = ChannelSettings.from_files(
            args.address,
            api_key=args.api_key,
            ca_file=args.tls_ca,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
        )
        with Client(settings=settings, timeout=args.timeout) as client:
            code: int = args.func(args, client)
            return code
    except InfermeshError as exc:
        sys.stdout.flush()
        _err(describe_error(exc, args.address))
        return 1
    except UsageError as exc:
        _err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
