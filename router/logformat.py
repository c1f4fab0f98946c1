"""Log lines as JSON, one object per line, for log shippers (``--log-format json``).

Opt-in: the default stays the plain text line people read. The choice travels
in ``DICOM_ROUTER_LOG_FORMAT``, so the children ``run`` starts write the same
format as it does. The fields are the text line's: when (ISO 8601, UTC), level,
process, logger, message, and the traceback when there is one; a message
names what it names in text (identifiers, never patient data:
docs/guarantees.md, G6).
"""

from __future__ import annotations

import datetime
import json
import logging

ENV = "DICOM_ROUTER_LOG_FORMAT"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)
