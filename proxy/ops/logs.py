"""Logging: one event per line, JSON by default (``PROXY_LOG_FORMAT=text`` for a console).

Modules log with ``logging.getLogger(__name__)`` and put structured fields in
``extra`` (``event``, ``handle``, ``team``, ``model``, ``status``,
``duration_ms``, ``upstream_status``...); the JSON formatter writes them as
keys. Secrets are never passed to a logger: they live in
:class:`~proxy.config.Secret`, whose text is asterisks.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("event", "handle", "team", "user", "model", "status", "duration_ms", "upstream_status", "method", "route",
          "path", "cache", "attempt", "outcome")


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._encode = json.JSONEncoder(ensure_ascii=False, default=str).encode  # json.dumps builds one per call

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1_000_000):06d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encode(line)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{name}={record.__dict__[name]}" for name in FIELDS
                          if record.__dict__.get(name) is not None and name != "event")
        return f"{text} [{fields}]" if fields else text


def configure_logging(level: str, fmt: str) -> None:
    # Neither formatter writes a record's thread, process or source line, so do not look them up for every
    # record (the logging module's documented optimisations).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # proxy.access writes one line per request
