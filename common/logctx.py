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
