"""The ``contiguouskv`` command: serve, register, query, trace, info, bench, rebalance, demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from contiguouskv import rebalance, trace_view
from contiguouskv.bench import kernels as bench_kernels
from contiguouskv.bench import load as bench_load
from contiguouskv.bench import perhead as bench_perhead
from contiguouskv.bench import quality as bench_quality
from contiguouskv.bench import reprefill as bench_reprefill
from contiguouskv.bench import storage as bench_storage
from contiguouskv.cache_server import server as cache_server
from contiguouskv.client import ContiguousKVError
from contiguouskv.common import telemetry
from contiguouskv.common.logs import setup_logging
from contiguouskv.connection import add_connection_arguments, client_from_args
from contiguouskv.demo import run_demo
from contiguouskv.progress import Progress

EPILOG = """examples:
  contiguouskv serve cache   --root /tmp/ckv-store --port 50051
  contiguouskv serve compute --model random:tiny --cache 127.0.0.1:50051 --port 50052 --metrics-port 9100
  contiguouskv register --server 127.0.0.1:50052 --file doc.txt --json
  contiguouskv query --server 127.0.0.1:50052 --prefix PREFIX_ID --text "Question?" --policy contiguous --budget 0.25
  contiguouskv trace --server 127.0.0.1:50052 --prefix PREFIX_ID --token-ids 1,2,3 --policy full --png trace.png

`--server` takes several compute servers as HOST:PORT,HOST:PORT (used in turn). Set
OTEL_EXPORTER_OTLP_ENDPOINT to export traces (needs the `otel` extra)."""

ERROR_HINTS = {
    "NOT_FOUND": "register the prefix first: contiguouskv register --server HOST:PORT --file FILE "
                 "(--token-ids 1,2,3 for a model without a tokenizer)",
    "DEADLINE_EXCEEDED": "give the call more time with --timeout SECONDS",
    "RESOURCE_EXHAUSTED": "the server hit a limit (the message names it); see docs/operations.md",
    "UNAUTHENTICATED": "the server requires a bearer token: --token-file FILE or env CKV_TOKEN",
    "PERMISSION_DENIED": "the token lacks the scope this call needs (read or write); see docs/security.md",
    "INTERNAL": "the server hit a bug; its log has the traceback",
}


def _token_ids(raw: str) -> list[int]:
    try:
        return [int(t) for t in raw.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--token-ids: expected comma-separated integers, got {raw[:40]!r}") from None


def _add_input(parser: argparse.ArgumentParser, what: str, with_file: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help=f"the {what} as text (tokenised by the server)")
    if with_file:
        group.add_argument("--file", type=Path, help=f"read the {what} text from this file")
    group.add_argument("--token-ids", type=_token_ids, help=f"the {what} as comma-separated token ids")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contiguouskv", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server").add_subparsers(dest="service", required=True)
    from contiguouskv.compute_server.flags import add_arguments as compute_args  # torch-free CLI: flags only

    cache_server.add_arguments(serve.add_parser("cache", help="storage node: serves prefix KV records from disk"))
    compute_args(serve.add_parser("compute", help="model server: registers prefixes, runs Re-Prefill"))

    reg = sub.add_parser("register", help="prefill a prefix once and store its KV")
    reg.add_argument("--server", required=True, help="compute server HOST:PORT")
    _add_input(reg, "prefix", with_file=True)
    reg.add_argument("--layouts", nargs="+", action="extend", default=[], choices=("contiguous", "impress"),
                     metavar="LAYOUT", help="layouts to store besides `contiguous` (always stored): `impress` "
                     "(64-token K/V blocks, probe keys, h2o scores) is what the h2o and impress policies read")
    reg.add_argument("--json", action="store_true", help="print one JSON object")
    reg.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    add_connection_arguments(reg)

    query = sub.add_parser("query", help="Re-Prefill: first token (and more) of prefix + query")
    query.add_argument("--server", required=True, help="compute server HOST:PORT")
    query.add_argument("--prefix", required=True, help="prefix id printed by `register`")
    _add_input(query, "query", with_file=False)
    query.add_argument("--policy", default="full",
                       help="a policy the server serves (`contiguouskv info` lists them): recompute, full, "
                       "contiguous, contiguous+, contiguous+1bit, contiguous+quest, contiguous+digest, oracle, h2o, "
                       "impress (default full); h2o and impress need a prefix registered with --layouts impress")
    query.add_argument("--budget", type=float,
                       help="fraction of the prefix to load (chunks; tokens for h2o/impress), in (0, 1] (default 1)")
    query.add_argument("--period", type=int, help="layers sharing one chunk selection (default 8)")
    query.add_argument("--sub-period", type=int, help="layers fetched per request run (default 4)")
    query.add_argument("--evaluate-recall", action="store_true",
                       help="chunk policies: also read every exact key and report the recall of the exact "
                       "top-k chunk set and of its attention mass, per layer")
    query.add_argument("--max-new-tokens", type=int, default=0, help="greedy tokens after the first")
    query.add_argument("--json", action="store_true", help="print one JSON object")
    query.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    add_connection_arguments(query)

    trace_view.add_arguments(sub.add_parser(
        "trace", help="one request's per-layer timeline (io wait vs compute): a table, --png, --json",
        description=trace_view.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    info = sub.add_parser("info", help="what a compute server runs: model shape, dtype, device, policies")
    info.add_argument("--server", required=True, help="compute server HOST:PORT")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    add_connection_arguments(info)

    bench = sub.add_parser("bench", help="benchmarks: every policy side by side (default); storage, quality, "
                           "perhead, kernels, load")
    bench_reprefill.add_arguments(bench)
    bench_sub = bench.add_subparsers(dest="bench", required=False)
    bench_storage.add_arguments(bench_sub.add_parser("storage", help="disk and Fetch data path of the cache server"))
    bench_quality.add_arguments(bench_sub.add_parser("quality", help="answer quality of every policy on a real model"))
    bench_perhead.add_arguments(bench_sub.add_parser(
        "perhead", help="exact chunk selection per KV head against one set per layer, equal bytes (in-process)"))
    bench_kernels.add_arguments(bench_sub.add_parser(
        "kernels", help="the per-layer hot-path kernels with fresh memory and with reused buffers (in-process)",
        description=bench_kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    bench_load.add_arguments(bench_sub.add_parser(
        "load", help="concurrent clients doing Re-Prefill: rps, TTFT percentiles, errors; --soak samples RSS",
        description=bench_load.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    rebalance.add_arguments(sub.add_parser(
        "rebalance", help="copy stored prefixes to the cache shards that own them (after adding shards)"))

    demo = sub.add_parser("demo", help="start both servers, register essays with the real Qwen model, ask questions")
    demo.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model (default the real Qwen)")
    demo.add_argument("--essays", type=int, default=3, help="how many essays form the prefix (default 3)")
    demo.add_argument("--workdir", type=Path, help="keep the store and server logs here")
    demo.add_argument("--no-regime", dest="regime", action="store_false",
                      help="skip the second part (a KV-heavy random model, 8K tokens, cold: about two minutes on a CPU)")
    return parser


def _cmd_register(args: argparse.Namespace) -> int:
    text = args.file.read_text() if args.file else args.text
    with client_from_args(args) as client, \
            Progress(f"registering on {args.server} (prefill, then store)"):
        layouts = [name for name in args.layouts if name != "contiguous"]
        r = client.register(text, token_ids=args.token_ids, extra_layouts=layouts) if text is not None else \
            client.register(token_ids=args.token_ids, extra_layouts=layouts)
    if args.json:
        print(json.dumps(asdict(r)))
    else:
        state = "already registered" if r.already_registered else f"stored {r.bytes_stored / 2**20:.1f} MiB"
        print(f"{r.prefix_id}  {r.num_tokens} tokens, {r.num_chunks} chunks of {r.chunk_size}, {state}")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    query = args.text if args.text is not None else args.token_ids
    with client_from_args(args) as client:
        r = client.reprefill(args.prefix, query, policy=args.policy, budget=args.budget,
                             max_new_tokens=args.max_new_tokens, period=args.period, sub_period=args.sub_period,
                             evaluate_recall=args.evaluate_recall)
    if args.json:
        out = asdict(r)
        out.update(ttft_ms=r.timings.ttft_ms, answer=r.answer)
        print(json.dumps(out))
    else:
        # Models without a tokenizer answer in token ids only.
        print(r.answer if r.answer else "token ids: " + ",".join(map(str, [r.token_id, *r.generated_ids])))
        print(f"[{r.policy}] ttft {r.timings.ttft_ms:.1f} ms (fetch wait {r.timings.fetch_wait_ms:.1f} ms, "
              f"compute {r.timings.compute_ms:.1f} ms), {r.bytes_fetched / 2**20:.2f} MiB fetched"
              + (f" ({r.bytes_fetched_shm / 2**20:.2f} MiB through shared memory)" if r.bytes_fetched_shm else ""),
              file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        info = client.model_info()
    if args.json:
        print(json.dumps(asdict(info)))
    else:
        print(f"{info.name} ({info.dtype} on {info.device}): {info.num_layers} layers, {info.num_kv_heads} KV heads "
              f"x {info.head_dim}, vocab {info.vocab_size}, chunk {info.chunk_size} tokens, "
              f"scoring in {info.score_dtype}, heads by {info.score_heads or 'sum'}, "
              f"from {f'the last {info.score_window} query tokens' if info.score_window else 'every query token'}; "
              f"policies {', '.join(info.policies)}")
    return 0


def _traced(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a client command with tracing set up for this process (service ``contiguouskv-cli``)."""
    with telemetry.tracing("contiguouskv-cli"):
        return command(args)


def _stop_children_on_sigterm() -> None:
    """bench and demo start servers as child processes and stop them on the way out; SIGTERM's
    default action would end this process at once and leave them running, so it exits instead."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            if args.service == "cache":
                return cache_server.run(cache_server.config_from_args(args))
            from contiguouskv.compute_server import server as compute  # torch-free CLI: only for serve compute

            return compute.run(compute.config_from_args(args))
        if args.command == "register":
            return _traced(_cmd_register, args)
        if args.command == "query":
            return _traced(_cmd_query, args)
        if args.command == "trace":
            return _traced(trace_view.run, args)
        if args.command == "info":
            return _traced(_cmd_info, args)
        if args.command == "rebalance":
            return rebalance.run(args)
        if args.command == "bench":
            runners = {"storage": bench_storage.run, "quality": bench_quality.run, "perhead": bench_perhead.run,
                       "load": bench_load.run, "kernels": bench_kernels.run}
            _stop_children_on_sigterm()
            return runners.get(args.bench, bench_reprefill.run)(args)
        _stop_children_on_sigterm()
        return run_demo(args.model, args.essays, args.workdir, args.regime)
    except ContiguousKVError as err:
        print(f"error: {err.status}: {err.details}", file=sys.stderr)
        if err.status in ERROR_HINTS:
            print(f"hint: {ERROR_HINTS[err.status]}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # an install without the model's packages
        print(f"error: {err}: the compute server, the demo and the benchmarks need the compute extra: "
              "pip install 'contiguouskv[compute]' (./scripts/bootstrap.sh installs everything)", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # unreadable --file, unwritable --png, a missing extra
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # config errors name their field
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
