"""Logging for the server: JSON lines on stderr, written by a listener thread.

Records are formatted where they are made (cheap: the access log's line is ready) and
queued as lines; a writer thread does the write(2), never the event loop. (The standard
QueueHandler copies every record first: a visible share of a manifest request.)
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gateway.access":
            return record.getMessage()
        data = {"level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class _LineQueue(logging.Handler):
    """Formats on the caller's thread (cheap) and queues the line: no record copy, no I/O."""

    def __init__(self, lines: queue.SimpleQueue[str | None]) -> None:
        super().__init__()
        self._lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put(self.format(record))
        except Exception:
            self.handleError(record)


class LogWriter:
    """The thread that writes queued lines to stderr, as many per write(2) as are waiting.

    After a write it sleeps a moment before looking again: a busy server then queues
    lines without waking a thread per line (a futex wake and a GIL hand-off each), and
    the writer does one write(2) per batch. A line waits at most `linger` seconds."""

    def __init__(self, lines: queue.SimpleQueue[str | None], linger: float = 0.05) -> None:
        self._lines = lines
        self._linger = linger
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def line(self, line: str) -> None:
        """Queue a ready line (the access log's, which is data rather than a log record:
        it skips the logging module, its record, filters and handler lock)."""
        self._lines.put(line)

    def stop(self) -> None:
        """Write what is queued, then end."""
        self._lines.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            line: str | None = self._lines.get()  # idle: block until there is a line
            batch = []
            while line is not None:
                batch.append(line)
                try:
                    line = self._lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                sys.stderr.write("\n".join(batch) + "\n")
                sys.stderr.flush()
            if line is None:
                return
            time.sleep(self._linger)


def start_logging(level: str) -> LogWriter:
    """Route every log record through a queue to stderr; stop the writer to flush."""
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    enqueue = _LineQueue(lines)
    enqueue.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [enqueue]
    root.setLevel(level.upper())
    writer = LogWriter(lines)
    writer.start()
    return writer
