"""The request id of the request being served, on every log line written while serving it.

The API sets `request_id` (a contextvar, so concurrent requests on one event loop keep their own) when a
request arrives; `RequestIdFilter` copies it onto each record for the `%(request_id)s` of the log format.
Lines written outside any request show `-`.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("axion_request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# Attributes every LogRecord has: anything else on a record came from `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id",
                                                                           "taskName"}


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line with time (ISO 8601, UTC), level, logger, message, process and
    request_id, plus whatever the call passed in `extra=` (model, job_id, timings...) and the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import UTC, datetime

        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "request_id": getattr(record, "request_id", request_id.get()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)
