"""Side-by-side latency of HTTP variants: interleaved measurement and the results table.

One owner for what ``benchmarks/tiled_auth.py`` and ``benchmarks/tiled_authority.py`` both
do: time sequential keep-alive GETs of several variants request by request, rotating the
order so background load hits every variant alike, and write median / p90 / ratio to a
baseline as a markdown table under ``benchmarks/results/``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx

__all__ = ["RESULTS", "measure", "interleaved", "latency_rows", "write_result"]

RESULTS = Path(__file__).resolve().parent / "results"


def measure(client: httpx.Client, url: str, n: int) -> list[float]:
    """``n`` sequential GETs; seconds each (every answer must be a 200)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    return out


def interleaved(clients: dict[str, httpx.Client], urls: dict[str, str], n: int,
                lat: dict[str, list[float]]) -> None:
    """One round: ``n`` requests per variant, request by request, in rotating order."""
    order = list(clients)
    for i in range(n):
        for m in order[i % len(order):] + order[:i % len(order)]:
            lat[m] += measure(clients[m], urls[m], 1)


def latency_rows(lat: dict[str, list[float]], base: str, extra_headers: tuple[str, ...] = (),
                 extra: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Markdown rows: variant, median ms, p90 ms, median ratio to ``base`` (+ extra columns)."""
    head = ("auth", "median ms", "p90 ms", f"ratio vs {base} (median)") + tuple(extra_headers)
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = statistics.median(lat[base])
    for m, xs in lat.items():
        xs = sorted(xs)
        med, p90 = statistics.median(xs), xs[int(0.9 * len(xs))]
        cells = (m, f"{med * 1e3:.2f}", f"{p90 * 1e3:.2f}", f"{med / ref:.2f}") + tuple((extra or {}).get(m, ()))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_result(name: str, title: str, rows: list[str], note: str) -> Path:
    """Print the table and write ``benchmarks/results/<name>.md``."""
    table = "\n".join(rows)
    print(table + "\n\n" + note)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.md"
    out.write_text(f"# {title}\n\n{table}\n\n{note}\n")
    return out
