"""The README's Python SDK examples run as written, against real servers (SmolLM2, which has a tokenizer).

Each ```python block of the "Python SDK" section runs in its own interpreter (so a block that sets up
tracing does not leak into the others), with the example addresses replaced by the test server's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE_ADDRESSES = ("127.0.0.1:50052", "127.0.0.1:50053")


def sdk_examples() -> list[str]:
    text = README.read_text()
    start = text.index("### Python SDK")
    end = text.index("\n## ", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server("smollm2-135m-instruct", cache.address, "--device", "cpu",
                                   "--dtype", "float32") as compute:
            yield compute.address


def test_the_section_has_the_examples() -> None:
    blocks = sdk_examples()
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    for name in ("ContiguousKVClient", "AsyncContiguousKVClient", "RetryPolicy", "NotFoundError", "generate",
                 "tracing("):
        assert name in joined, name


@pytest.mark.parametrize("index", range(len(sdk_examples())))
def test_example_runs(index: int, address: str) -> None:
    code = sdk_examples()[index]
    for example in EXAMPLE_ADDRESSES:
        code = code.replace(example, address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"README example {index + 1} failed:\n{code}\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), f"README example {index + 1} printed nothing"
    if "NotFoundError" in code:
        assert "not registered yet:" in out.stdout
