"""Detection quality of the router's guardrails on the labelled set in tests/data/guardrails.jsonl.

    python bench/guardrails.py [--data FILE] [--misses]

Each line is {"text", "injection": bool, "pii": [kinds]}. Prints precision and recall of the
prompt-injection detector and of each PII kind (a text counts as detected for a kind when at
least one finding of that kind is in it), and the detectors' speed in texts per second.
`--misses` lists the false negatives and false positives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.router.core.guardrails import injection, pii  # noqa: E402


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.3f}" if den else "-"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "guardrails.jsonl"))
    parser.add_argument("--misses", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]

    start = time.perf_counter()
    predicted = [(injection.score(r["text"]).flagged, {f.kind for f in pii.find(r["text"])}) for r in rows]
    elapsed = time.perf_counter() - start

    benign = sum(1 for r in rows if not r["injection"] and not r["pii"])
    table = Table(
        "detector",
        "positives",
        "TP",
        "FP",
        "FN",
        "precision",
        "recall",
        title=(f"{len(rows)} labelled texts ({benign} benign), {len(rows) / elapsed:,.0f} texts/s"),
    )
    misses: list[str] = []
    checks = [("prompt injection", lambda r, p: r["injection"], lambda r, p: p[0])]
    checks += [
        (
            f"pii: {kind}",
            (lambda k: lambda r, p: k in r["pii"])(kind),
            (lambda k: lambda r, p: k in p[1])(kind),
        )
        for kind in pii.KINDS
    ]
    checks.append(("pii: any", lambda r, p: bool(r["pii"]), lambda r, p: bool(p[1])))
    for name, truth, guess in checks:
        tp = fp = fn = 0
        for row, pred in zip(rows, predicted, strict=True):
            t, g = truth(row, pred), guess(row, pred)
            tp += t and g
            fp += g and not t
            fn += t and not g
            if t != g:
                misses.append(f"{'FN' if t else 'FP'} {name}: {row['text']!r}")
        table.add_row(name, str(tp + fn), str(tp), str(fp), str(fn), _ratio(tp, tp + fp), _ratio(tp, tp + fn))
    Console().print(table)
    if args.misses:
        print("\n".join(misses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
