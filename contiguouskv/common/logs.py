"""Logging set-up for the CLI and servers: plain text or one JSON object per line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import Iterator

from contiguouskv.common.telemetry import current_trace_ids


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (time, level, logger, message, the current trace and span
    ids when the record is logged inside a span, extra ``ckv_*`` fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = current_trace_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        for key, value in record.__dict__.items():
            if key.startswith("ckv_"):
                out[key[4:]] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, writing to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in grpc_log.filters):
        grpc_log.addFilter(ClientGoneFilter())


class ClientGoneFilter(logging.Filter):
    """grpc's asyncio server logs ``ExecuteBatchError raised in core by servicer method [...]`` at
    ERROR, with a traceback, when a handler's response or status could not be sent because the
    client had already cancelled or gone (grpc/grpc#32551 made it a log line instead of an
    unretrieved task exception). Nothing failed on the server: the filter rewrites the record as
    one WARNING line that says so."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.PREFIX):
            method = record.getMessage()[len(self.PREFIX):].strip()
            record.msg = "%s: the client left before the response was sent (grpc: ExecuteBatchError)"
            record.args = (method,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


class _LinesToLog(io.TextIOBase):
    """A text stream whose complete lines become log records; a line redrawn in place (``\\r``, a
    progress bar) is logged once, as it last stood."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger, self._level, self._line = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            line = line.rsplit("\r", 1)[-1].strip()  # what the terminal would show last
            if line:
                self._logger.log(self._level, "%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def close_line(self) -> None:
        if self._line.strip():
            self.write("\n")


@contextlib.contextmanager
def stderr_to_log(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """Inside, what libraries print to ``sys.stderr`` (model loading's progress bars, warnings)
    goes through ``logger`` instead, so a server's log stays one record per line (JSON lines with
    ``--log-format json``). Handlers made before keep the real stderr."""
    stream = _LinesToLog(logger, level)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.close_line()
