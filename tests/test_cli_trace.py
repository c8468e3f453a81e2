"""The CLI for people: `contiguouskv trace`, `info`, progress indicators, complete --help, no prints in servers."""

from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch, trace_view
from contiguouskv.cli import build_parser
from contiguouskv.progress import Progress, render

ROOT = Path(__file__).resolve().parents[1]
SAVED = {"policy": "contiguous", "budget": 0.5, "prefix_tokens": 100, "bytes_fetched": 3 << 20,
         "timings": {"ttft_ms": 12.0, "fetch_wait_ms": 5.0, "compute_ms": 7.0, "fetch_ms": 6.0, "total_ms": 12.0,
                     "layers": [{"layer": 1, "wait_ms": 1.0, "compute_ms": 3.0, "bytes": 2048},
                                {"layer": 0, "wait_ms": 4.0, "compute_ms": 2.0, "bytes": 1024}]}}


def ckv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contiguouskv", *args], capture_output=True, text=True,
                          timeout=120, input=stdin)


def test_layer_rows_follow_each_other() -> None:
    rows = trace_view.layer_rows(SAVED["timings"]["layers"])
    assert [(r.layer, r.start_ms, r.end_ms) for r in rows] == [(0, 0.0, 6.0), (1, 6.0, 10.0)]
    cells = [trace_view.timeline_cell(r, 10.0, 20) for r in rows]
    assert cells[0] == "\u00b7" * 8 + "\u2588" * 4
    assert cells[1] == " " * 12 + "\u00b7" * 2 + "\u2588" * 6
    # a wait the table prints as 0.00 draws nothing; one it prints as 0.01 draws a character
    tiny = [trace_view.LayerRow(0, 0.0, wait, 5.0, 0) for wait in (0.004, 0.006)]
    assert [trace_view.timeline_cell(r, 10.0, 20).count("\u00b7") for r in tiny] == [0, 1]
    text = trace_view.table(SAVED)
    assert "policy contiguous budget 0.50" in text and "ttft 12.0 ms" in text and "io wait 50%" in text


def test_trace_from_saved_json_table_json_and_png(tmp_path: Path) -> None:
    saved = tmp_path / "q.json"
    saved.write_text(json.dumps(SAVED))
    out = ckv("trace", "--from-json", str(saved), "--png", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 5 and "timeline" in out.stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    piped = ckv("trace", "--from-json", "-", "--json", stdin=json.dumps(SAVED))
    rows = json.loads(piped.stdout)["layers"]
    assert [(r["layer"], r["start_ms"]) for r in rows] == [(0, 0.0), (1, 6.0)]


def test_trace_errors_say_what_to_do(tmp_path: Path) -> None:
    neither = ckv("trace")
    assert neither.returncode == 2 and "--from-json FILE or --server" in neither.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    out = ckv("trace", "--from-json", str(bad))
    assert out.returncode == 2 and "contiguouskv query" in out.stderr and "--json" in out.stderr
    down = ckv("trace", "--server", "127.0.0.1:1", "--prefix", "f" * 32, "--token-ids", "1", "--timeout", "3")
    assert down.returncode == 1 and "127.0.0.1:1" in down.stderr and "contiguouskv serve compute" in down.stderr


@pytest.fixture(scope="module")
def compute_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server("random:tiny", cache.address, "--dtype", "float32") as compute:
            yield compute.address


def test_trace_info_and_register_against_a_server(compute_address: str, tmp_path: Path) -> None:
    info = json.loads(ckv("info", "--server", compute_address, "--json").stdout)
    reg = ckv("register", "--server", compute_address, "--token-ids", ",".join(map(str, range(50))), "--json")
    assert reg.returncode == 0 and reg.stderr == "", reg.stderr  # no progress drawn when not a terminal
    prefix = json.loads(reg.stdout)["prefix_id"]
    out = ckv("trace", "--server", compute_address, "--prefix", prefix, "--token-ids", "1,2", "--policy", "full",
              "--png", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    layer_lines = [line for line in out.stdout.splitlines()[2:] if line.split()[0].isdigit()]
    assert len(layer_lines) == info["num_layers"]
    assert (tmp_path / "t.png").stat().st_size > 1000
    missing = ckv("query", "--server", compute_address, "--prefix", "0" * 32, "--token-ids", "1")
    assert missing.returncode == 1 and "hint: register the prefix first" in missing.stderr


def test_progress_draws_only_on_a_terminal() -> None:
    assert render("bench", 1.25, 3, 12) == "bench [######..................] 3/12 1.2s"
    assert render("registering", 2.0, tick=1) == "/ registering 2.0s"
    quiet = io.StringIO()
    with Progress("x", total=2, stream=quiet) as bar:  # StringIO is not a terminal
        bar.advance()
        bar.write("a line")
    assert quiet.getvalue() == "a line\n"
    shown = io.StringIO()
    with Progress("x", total=2, stream=shown, enabled=True, interval_s=60) as bar:
        bar.advance()
    assert "x [" in shown.getvalue() and "1/2" in shown.getvalue() and shown.getvalue().endswith("\r\x1b[K")


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{path} {name}: no help line"
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_help_is_complete() -> None:
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _walk(build_parser(), "contiguouskv")
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options without help: {missing}"
    for command in ("trace", "info", "query", "register", "serve compute", "serve cache", "bench"):
        out = ckv(*command.split(), "--help")
        assert out.returncode == 0 and "usage: contiguouskv" in out.stdout, command


def test_servers_never_print() -> None:
    found = []
    for folder in ("cache_server", "compute_server", "contiguouskv/common"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"print in server code (use logging): {found}"
