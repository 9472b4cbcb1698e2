"""`infermesh batch submit|status|results|cancel` against a router with fake workers."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from infermesh import cli
from tests.integration.router.conftest import Mesh


async def run(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


async def test_submit_follows_progress_then_results_come_in_order(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = [
        {"custom_id": "a", "messages": [{"role": "user", "content": "first question"}], "max_tokens": 16},
        {"custom_id": "b", "messages": "second question"},
        {"prompt": "raw prompt text", "seed": 3},
    ]
    path = write_jsonl(tmp_path / "jobs.jsonl", requests)
    code = await run("--address", mesh.address, "batch", "submit", str(path), "--interval", "0.05")
    out, err = capsys.readouterr()
    assert code == 0, err
    first, last = out.splitlines()[0], out.splitlines()[-1]
    batch_id = first.split()[1].rstrip(":")
    assert first == f"batch {batch_id}: 3 requests submitted"
    assert last == f"{batch_id} (jobs.jsonl): succeeded, 3/3 done, 0 failed"
    assert "3/3" in err  # the progress bar

    output = tmp_path / "out.jsonl"
    assert await run("--address", mesh.address, "batch", "results", batch_id, "-o", str(output)) == 0
    assert capsys.readouterr().err == f"3 results written to {output}\n"
    got = [json.loads(line) for line in output.read_text().splitlines()]
    # The same in one command: submit, follow, write the results.
    again = tmp_path / "again.jsonl"
    assert await run("--address", mesh.address, "batch", "submit", str(path), "-o", str(again)) == 0
    assert [json.loads(line)["text"] for line in again.read_text().splitlines()] == [r["text"] for r in got]
    capsys.readouterr()
    assert [(r["custom_id"], r["text"]) for r in got] == [
        ("a", "echo: first question"),
        ("b", "echo: second question"),
        ("3", "echo: raw prompt text"),
    ]
    assert all(r["finish_reason"] == "stop" and r["usage"]["completion_tokens"] > 0 for r in got)

    assert await run("--address", mesh.address, "batch", "status", batch_id) == 0
    assert capsys.readouterr().out.strip() == last
    assert await run("--address", mesh.address, "batch", "status") == 0
    assert batch_id in capsys.readouterr().out


async def test_no_wait_returns_at_once_and_cancel_ends_the_job(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for w in mesh.workers:
        w.hold_after = 0
        w.release.clear()
    try:
        path = write_jsonl(tmp_path / "held.jsonl", [{"messages": f"held {i}"} for i in range(5)])
        assert await run("--address", mesh.address, "batch", "submit", str(path), "--no-wait") == 0
        batch_id = capsys.readouterr().out.split()[1].rstrip(":")
        assert await run("--address", mesh.address, "batch", "cancel", batch_id) == 0
        assert ": cancelled, 0/5 done" in capsys.readouterr().out
    finally:
        for w in mesh.workers:
            w.hold_after = None
            w.release.set()


async def test_a_bad_batch_file_names_the_line(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": "fine"}\n\n{"mesages": "typo"}\n')
    assert await run("--address", mesh.address, "batch", "submit", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:3: unknown field 'mesages'")

    monkeypatch.setattr("sys.stdin", io.StringIO('{"messages": "from stdin"}\n'))
    assert await run("--address", mesh.address, "batch", "submit", "-", "--no-wait") == 0
    assert "1 requests submitted" in capsys.readouterr().out

    path.write_text('{"messages": "fine"}\nnot json\n')
    assert await run("--address", mesh.address, "batch", "submit", str(path)) == 2
    assert f"{path}:2: not JSON" in capsys.readouterr().err

    # Checked by the router: the item and field are named.
    path.write_text('{"messages": "fine", "temperature": -2}\n')
    assert await run("--address", mesh.address, "batch", "submit", str(path)) == 1
    assert "items[0].request.sampling.temperature" in capsys.readouterr().err
