"""What a `warm` run found (`ImageOutcome`, per image) and how it is shown: a progress
line per image (redrawn in place on a terminal, plain lines otherwise) and the summary
as a table or JSON. Writes happen in a thread, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_BAR = 20


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; exact below 1 KiB."""
    value, unit = float(count), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


@dataclass
class ImageOutcome:
    """One image of a run: what was planned, what arrived and from where, what failed.
    Bytes count blobs (config and layers); manifests are listed with their X-Cache."""

    image: str
    digest: str | None = None  # of the manifest the reference named
    platforms: list[str] = field(default_factory=list)
    missing_platforms: list[str] = field(default_factory=list)
    manifests: list[tuple[str, str]] = field(default_factory=list)  # (digest, X-Cache)
    blobs: int = 0
    blobs_done: int = 0
    bytes_expected: int = 0
    bytes: int = 0  # received
    from_cache: int = 0  # received with X-Cache: HIT
    from_upstream: int = 0  # received with MISS, COALESCED or STALE
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def error(self) -> str | None:
        if not self.errors:
            return None
        more = len(self.errors) - 1
        return self.errors[0] + (f" (and {more} more failure{'s' * (more > 1)})" if more else "")

    def received(self, count: int, cache: str) -> None:
        self.bytes += count
        if cache == "HIT":
            self.from_cache += count
        else:
            self.from_upstream += count

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "digest": self.digest, "platforms": self.platforms,
                "missing_platforms": self.missing_platforms,
                "manifests": [{"digest": d, "cache": c} for d, c in self.manifests],
                "blobs": self.blobs, "blobs_done": self.blobs_done,
                "bytes_expected": self.bytes_expected, "bytes": self.bytes,
                "bytes_from_cache": self.from_cache,
                "bytes_from_upstream": self.from_upstream,
                "seconds": round(self.seconds, 3), "ok": not self.failed,
                "error": self.error}


def progress_line(outcome: ImageOutcome) -> str:
    total = max(outcome.bytes_expected, 1)
    filled = min(_BAR, outcome.bytes * _BAR // total)
    return (f"{outcome.image}  [{'#' * filled}{'.' * (_BAR - filled)}]  "
            f"{human_bytes(outcome.bytes)} / {human_bytes(outcome.bytes_expected)}  "
            f"{outcome.blobs_done}/{outcome.blobs} blobs")


def final_line(outcome: ImageOutcome) -> str:
    if outcome.failed:
        return f"{outcome.image}  FAILED: {outcome.error}"
    missing = (f"; not in the index: {', '.join(outcome.missing_platforms)}"
               if outcome.missing_platforms else "")
    return (f"{outcome.image}  done: {outcome.blobs} blobs, {human_bytes(outcome.bytes)} "
            f"({human_bytes(outcome.from_cache)} from cache, "
            f"{human_bytes(outcome.from_upstream)} from upstream) in "
            f"{outcome.seconds:.1f}s{missing}")


class Display:
    """Progress on `out`. On a terminal the current image's line is redrawn in place (at
    most every `tick` seconds); otherwise a plain progress line at most every `every`."""

    def __init__(self, out: TextIO, *, tty: bool, width: int = 120, tick: float = 0.1,
                 every: float = 5.0) -> None:
        self._out, self._tty, self._width = out, tty, max(width - 1, 20)
        self._tick, self._every = tick, every
        self._pending: list[str] = []
        self._current: ImageOutcome | None = None
        self._shown: str | None = None  # the status last written
        self._last_plain = 0.0
        self._task: asyncio.Task[None] | None = None

    def planned(self, outcome: ImageOutcome) -> None:
        """The image's blobs are known: from now on it has a progress line."""
        self._current = outcome
        if not self._tty:
            self._pending.append(
                f"{outcome.image}: {', '.join(outcome.platforms) or 'single platform'}; "
                f"{outcome.blobs} blobs, {human_bytes(outcome.bytes_expected)}")
            self._last_plain = time.monotonic()

    def end(self, outcome: ImageOutcome) -> None:
        self._pending.append(final_line(outcome))
        self._current = None

    async def __aenter__(self) -> Display:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            await self._flush()

    def render(self) -> str:
        """The text to write now: finished lines, then the current status (if due)."""
        status = progress_line(self._current) if self._current is not None else None
        if self._tty:
            clear = "\r\x1b[K" if self._shown is not None else ""
            if not self._pending and status == self._shown:
                return ""
            # Only the status line must fit the width: \r can redraw one screen line.
            text = clear + "".join(line + "\n" for line in self._pending)
            self._shown = status
            return text + (status[:self._width] if status is not None else "")
        text = "".join(line + "\n" for line in self._pending)
        now = time.monotonic()
        if status is not None and status != self._shown and now - self._last_plain >= \
                self._every:
            text, self._shown, self._last_plain = text + status + "\n", status, now
        return text

    async def _flush(self) -> None:
        text = self.render()
        self._pending.clear()
        if text:
            await asyncio.to_thread(self._write, text)

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def summary_json(outcomes: Sequence[ImageOutcome], seconds: float) -> dict[str, Any]:
    return {"images": [o.to_json() for o in outcomes], "total": {
        "images": len(outcomes), "failed": sum(o.failed for o in outcomes),
        "blobs": sum(o.blobs_done for o in outcomes),
        "bytes": sum(o.bytes for o in outcomes),
        "bytes_from_cache": sum(o.from_cache for o in outcomes),
        "bytes_from_upstream": sum(o.from_upstream for o in outcomes),
        "seconds": round(seconds, 3)}}


def summary_text(outcomes: Sequence[ImageOutcome], seconds: float) -> str:
    """A table: per image and in total, blobs, bytes, from cache, from upstream, time."""
    head = ("IMAGE", "PLATFORMS", "BLOBS", "BYTES", "FROM CACHE", "FROM UPSTREAM", "TIME")
    rows = [(o.image, "FAILED" if o.failed else ",".join(o.platforms) or "-",
             str(o.blobs_done) if o.blobs_done == o.blobs else f"{o.blobs_done}/{o.blobs}",
             human_bytes(o.bytes), human_bytes(o.from_cache),
             human_bytes(o.from_upstream), f"{o.seconds:.1f}s") for o in outcomes]
    total = summary_json(outcomes, seconds)["total"]
    failed = f", {total['failed']} failed" if total["failed"] else ""
    rows.append((f"total ({len(outcomes)} image{'s' * (len(outcomes) != 1)}{failed})", "",
                 str(total["blobs"]), human_bytes(total["bytes"]),
                 human_bytes(total["bytes_from_cache"]),
                 human_bytes(total["bytes_from_upstream"]), f"{seconds:.1f}s"))
    widths = [max(len(row[n]) for row in (head, *rows)) for n in range(len(head))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in (head, *rows)]
    return "\n".join(lines) + "\n"
