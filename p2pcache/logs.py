"""Logging for the daemon: one format for our lines and the libraries' (py-libp2p, hypercorn), as text
or JSON lines for CI log collectors.

Owns: the root handler, the levels of our loggers (`p2pcache.*`) and of everyone else's. Libraries log
below WARNING only when asked (`library_level`), and a library call site that repeats itself is
printed once a minute with a count of what it held back — py-libp2p warns on every failed dial of a
dead bootstrap peer. It must not decide what is worth logging inside our own modules.

py-libp2p configures its `libp2p` logger at import with no handler and `propagate = False`, so its
warnings reached stderr through Python's last-resort handler, unformatted; `setup_logging` takes that
logger back into the common handler.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
REPEAT_WINDOW = 60.0  # seconds between two lines from one library call site


class TextFormatter(logging.Formatter):
    """`2026-12-01T09:30:00.123Z WARNING p2pcache.node: message` (UTC, one line)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        text = f"{stamp} {record.levelname} {record.name}: {_message(record)}"
        return text.replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message[, error]."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            obj["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(obj, sort_keys=True)


def _message(record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        msg += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    return msg


class LibraryFilter(logging.Filter):
    """Library records below `level` are dropped (py-libp2p sets levels on some of its own loggers, so
    logger levels alone do not hold); with `window`, a library call site (logger, line) gets through
    once per `window` seconds and its next line says how many were held back. Our own loggers are
    never filtered."""

    def __init__(self, level: int, window: float | None = REPEAT_WINDOW, clock=time.monotonic) -> None:
        super().__init__()
        self.level = level
        self.window = window
        self.clock = clock
        self._last: dict[tuple[str, int], float] = {}
        self._held: dict[tuple[str, int], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "p2pcache" or record.name.startswith("p2pcache."):
            return True
        if record.levelno < self.level:
            return False
        if self.window is None:
            return True
        site = (record.name, record.lineno)
        now = self.clock()
        last = self._last.get(site)
        if last is not None and now - last < self.window:
            self._held[site] = self._held.get(site, 0) + 1
            return False
        self._last[site] = now
        held = self._held.pop(site, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines in the last {self.window:.0f} s not shown)"
            record.args = ()
        return True


def setup_logging(level: str = "warning", fmt: str = "text", library_level: str | None = None,
                  stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to one handler on `stream` (stderr). `level` is ours; libraries log at
    `library_level`, by default the more severe of `level` and WARNING."""
    if fmt not in FORMATS:
        from .errors import InvalidInput

        raise InvalidInput(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    ours = _level(level)
    libs = _level(library_level) if library_level else max(ours, logging.WARNING)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(LibraryFilter(libs, REPEAT_WINDOW if libs > logging.DEBUG else None))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(libs)  # records of p2pcache.* reach the handler at their own level (propagation skips levels)
    logging.getLogger("p2pcache").setLevel(ours)
    for name in ("libp2p", "multiaddr", "hypercorn", "httpx", "httpcore", "trio"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(libs)
    for name, entry in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(entry, logging.Logger):
            entry.handlers.clear()
            entry.propagate = True
            entry.setLevel(logging.NOTSET)  # inherit the level set above
    if library_level is None:
        # py-libp2p's DHT warns "Failed to read DHT message" on every stream a peer closes normally.
        logging.getLogger("libp2p.kad_dht.kad_dht").setLevel(max(libs, logging.ERROR))
    return handler


def _level(name: str) -> int:
    if name.lower() not in LEVELS:
        from .errors import InvalidInput

        raise InvalidInput(f"log level {name!r} is not one of {', '.join(LEVELS)}")
    return getattr(logging, name.upper())
