"""Logging for the server: JSON lines on stderr, written by a listener thread.

Records are formatted where they are made (cheap: the access log's line is ready) and
queued; the write(2) happens in the QueueListener's thread, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gateway.access":
            return record.getMessage()
        data = {"level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def start_logging(level: str) -> logging.handlers.QueueListener:
    """Route every log record through a queue to stderr; stop the listener to flush."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = logging.handlers.QueueHandler(records)
    enqueue.setFormatter(JsonFormatter())
    write = logging.StreamHandler(sys.stderr)
    write.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [enqueue]
    root.setLevel(level.upper())
    listener = logging.handlers.QueueListener(records, write)
    listener.start()
    return listener
