"""``contiguouskv trace``: one request's per-layer timeline, I/O wait vs compute, as a table and a PNG.

The timings come from the response itself (``ReprefillResult.timings.layers``: per layer the time
blocked on its records and the time computing, and the bytes read), either from a request made now
or from a saved ``contiguouskv query --json`` output. Layers run one after another on the compute
thread, so a layer starts where the previous one ended. Within a layer the wait falls between the
projections and the attention; the timeline draws it first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contiguouskv.connection import add_connection_arguments, client_from_args

WAIT_CHAR, COMPUTE_CHAR = "\u00b7", "\u2588"  # middle dot, full block


@dataclass(frozen=True)
class LayerRow:
    """One layer on the request's timeline (milliseconds from the first layer's start)."""

    layer: int
    start_ms: float
    wait_ms: float
    compute_ms: float
    bytes: int

    @property
    def end_ms(self) -> float:
        return self.start_ms + self.wait_ms + self.compute_ms


SHOWN_MS = 0.005  # the table prints milliseconds to two decimals: less reads as 0.00


def layer_rows(layers: Sequence[Mapping[str, Any]]) -> list[LayerRow]:
    """Rows from the response's per-layer timings (dicts with layer, wait_ms, compute_ms, bytes)."""
    rows, start = [], 0.0
    for t in sorted(layers, key=lambda x: int(x["layer"])):
        row = LayerRow(int(t["layer"]), start, float(t["wait_ms"]), float(t["compute_ms"]), int(t.get("bytes", 0)))
        rows.append(row)
        start = row.end_ms
    return rows


def timeline_cell(row: LayerRow, total_ms: float, width: int) -> str:
    """The row's stretch of a ``width``-character timeline: blank until it starts, then wait, then
    compute (at least one character for a part the table shows as non-zero, i.e. from 0.005 ms)."""
    scale = width / total_ms if total_ms > 0 else 0.0
    lead = int(round(row.start_ms * scale))
    wait = max(1 if row.wait_ms >= SHOWN_MS else 0, int(round(row.wait_ms * scale)))
    compute = max(1 if row.compute_ms >= SHOWN_MS else 0, int(round(row.compute_ms * scale)))
    return (" " * lead + WAIT_CHAR * wait + COMPUTE_CHAR * compute)[: width + 2]


def summary_line(result: Mapping[str, Any]) -> str:
    t = result["timings"]
    budget = f" budget {result['budget']:.2f}" if result.get("budget") not in (None, 1.0) else ""
    return (f"policy {result.get('policy', '?')}{budget}, prefix {result.get('prefix_tokens', '?')} tokens, "
            f"ttft {t['ttft_ms']:.1f} ms (io wait {t['fetch_wait_ms']:.1f} ms, compute {t['compute_ms']:.1f} ms), "
            f"{int(result.get('bytes_fetched', 0)) / 2**20:.2f} MiB fetched")


def table(result: Mapping[str, Any], width: int = 40) -> str:
    """The terminal table: one line per layer with its numbers and its stretch of the timeline."""
    rows = layer_rows(result["timings"]["layers"])
    if not rows:
        return summary_line(result) + "\n(no per-layer timings: `recompute` runs the prefill in one piece)"
    total = rows[-1].end_ms
    lines = [summary_line(result),
             f"{'layer':>5} {'start ms':>9} {'wait ms':>8} {'compute ms':>10} {'KiB read':>9}  "
             f"timeline ({WAIT_CHAR} io wait, {COMPUTE_CHAR} compute; {total:.1f} ms)"]
    for row in rows:
        lines.append(f"{row.layer:>5} {row.start_ms:>9.2f} {row.wait_ms:>8.2f} {row.compute_ms:>10.2f} "
                     f"{row.bytes / 1024:>9.1f}  {timeline_cell(row, total, width)}")
    waits = sum(r.wait_ms for r in rows)
    lines.append(f"{'all':>5} {'':>9} {waits:>8.2f} {sum(r.compute_ms for r in rows):>10.2f} "
                 f"{sum(r.bytes for r in rows) / 1024:>9.1f}  io wait {100 * waits / total if total else 0:.0f}% "
                 "of the layer loop")
    return "\n".join(lines)


def render_png(result: Mapping[str, Any], path: Path) -> None:
    """A horizontal bar per layer (io wait, then compute) on a millisecond axis, written to ``path``."""
    try:
        import matplotlib  # optional: the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: the bench extra
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install 'contiguouskv[bench]'") from None
    rows = layer_rows(result["timings"]["layers"])
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(rows) + 1.5)))
    ax.barh([r.layer for r in rows], [r.wait_ms for r in rows], left=[r.start_ms for r in rows],
            color="#f4a261", label="io wait")
    ax.barh([r.layer for r in rows], [r.compute_ms for r in rows],
            left=[r.start_ms + r.wait_ms for r in rows], color="#2a6f97", label="compute")
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first layer started")
    ax.set_ylabel("layer")
    ax.set_title(summary_line(result), fontsize=8)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("where the timings come from (one of)")
    source.add_argument("--from-json", metavar="FILE",
                        help="a saved `contiguouskv query --json` output ('-' reads stdin)")
    source.add_argument("--server", help="run a query now on this compute server HOST:PORT[,HOST:PORT...]")
    query = parser.add_argument_group("the query to run (with --server)")
    query.add_argument("--prefix", help="prefix id printed by `register`")
    query.add_argument("--text", help="the query as text (tokenised by the server)")
    query.add_argument("--token-ids", help="the query as comma-separated token ids")
    query.add_argument("--policy", default="full", help="loading policy (default full); see `query --help`")
    query.add_argument("--budget", type=float, help="fraction of the prefix to load, in (0, 1]")
    query.add_argument("--period", type=int, help="layers sharing one chunk selection")
    query.add_argument("--sub-period", type=int, help="layers fetched per request run")
    query.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    add_connection_arguments(query)
    out = parser.add_argument_group("output")
    out.add_argument("--png", type=Path, metavar="PATH", help="also write the timeline as a PNG here")
    out.add_argument("--width", type=int, default=40, help="characters of the terminal timeline (default 40)")
    out.add_argument("--json", action="store_true",
                     help="print the per-layer rows (and the summary) as one JSON object instead of the table")


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    if not args.prefix or (args.text is None) == (args.token_ids is None):
        raise ValueError("trace --server: give --prefix and one of --text or --token-ids (or use --from-json FILE)")
    try:
        query: str | list[int] = args.text if args.text is not None else \
            [int(x) for x in args.token_ids.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--token-ids: expected comma-separated integers, got {args.token_ids[:40]!r}") from None
    with client_from_args(args) as client:
        r = client.reprefill(args.prefix, query, policy=args.policy, budget=args.budget, period=args.period,
                             sub_period=args.sub_period)
    return asdict(r)


def _load(source: str) -> dict[str, Any]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--from-json {source}: not JSON ({err}); save it with `contiguouskv query ... --json`") from None
    if not isinstance(data, dict) or "layers" not in data.get("timings", {}):
        raise ValueError(f"--from-json {source}: no timings.layers; expected `contiguouskv query --json` output")
    return data


def run(args: argparse.Namespace) -> int:
    if (args.from_json is None) == (args.server is None):
        raise ValueError("trace: give exactly one of --from-json FILE or --server HOST:PORT")
    result = _load(args.from_json) if args.from_json is not None else _fetch(args)
    if args.json:
        rows = [asdict(r) for r in layer_rows(result["timings"]["layers"])]
        print(json.dumps({"summary": summary_line(result), "policy": result.get("policy"),
                          "ttft_ms": result["timings"]["ttft_ms"], "layers": rows}))
    else:
        print(table(result, args.width))
    if args.png is not None:
        render_png(result, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
