"""Prefix-cache hits of multi-turn sessions with session affinity on and off, in one run.

    python bench/affinity.py [--sessions 6] [--turns 5] [--max-tokens 12] [--rounds 1]
                             [--affinity-factor 1.5]

Two real workers (the packaged model, one torch thread, a 1024-token context, 128 MB of KV
cache) are served in this process; for each round, a fresh router with affinity on and then
one with it off carry the same shape of conversations (different topics, so the second finds
only the shared chat-template prefix left by the first). The table gives the share of prompt
tokens the workers found in their prefix caches and how many later turns moved worker.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.router.real_workers import AffinityRun, real_workers, run_conversations  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    runs: list[AffinityRun] = []
    async with real_workers({}, {}) as workers:
        offset = 0
        for _ in range(args.rounds):
            for affinity in (True, False):
                runs.append(
                    await run_conversations(
                        workers,
                        session_affinity=affinity,
                        sessions=args.sessions,
                        turns=args.turns,
                        max_tokens=args.max_tokens,
                        topic_offset=offset,
                        affinity_factor=args.affinity_factor,
                    )
                )
                offset += args.sessions
    print(
        f"{args.sessions} sessions x {args.turns} turns, {args.max_tokens} tokens a reply, 2 workers, "
        f"affinity_factor {args.affinity_factor}"
    )
    header = ("session_affinity", "hit ratio", "hit tokens", "prompt tokens", "moved turns")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (16, 9, 10, 13, 11), strict=True)))
    for run in runs:
        later = run.turns - args.sessions
        print(
            f"{run.session_affinity!s:>16} {run.hit_ratio:>9.3f} {run.hit_tokens:>10} "
            f"{run.prompt_tokens:>13} {f'{run.moved}/{later}':>11}"
        )
    on = [r.hit_ratio for r in runs if r.session_affinity]
    off = [r.hit_ratio for r in runs if not r.session_affinity]
    print(f"hit ratio on / off: {sum(on) / len(on) / max(sum(off) / len(off), 1e-9):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--affinity-factor",
        type=float,
        default=1.5,
        help="the router's affinity_factor (default: its default)",
    )
    asyncio.run(main(parser.parse_args()))
