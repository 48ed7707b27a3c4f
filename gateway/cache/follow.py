"""Following a blob transfer another process leads: its published progress mirrored into
this process's `BlobFlight`, so readers here stream the leader's spool as it grows and
the committed file once it is done.

Fetches nothing and keeps nothing. The last byte is released only once the leader
said the blob verified; a leader that dies mid-transfer fails the readers here cleanly.
"""

from __future__ import annotations

import asyncio

from ..errors import RegistryError
from .coordinate import FAILED, STARTING, VERIFIED, Follow, Lead
from .flight import BlobFlight, FetchAborted

POLL = 0.01  # seconds between looks at the leader's record (memory reads)
LOCK_CHECK = 0.1  # seconds between looks at whether the leader still holds its lock


class LeaderLost(FetchAborted):
    """The process fetching the blob stopped before it was verified."""


async def follow(flight: BlobFlight, claim: Follow) -> Lead | None:
    """Mirror the leader into `flight` until its transfer ends (None). If the leader dies
    before anything was announced here, this process leads now: the Lead is returned and
    the flight is left untouched for it to run."""
    generation: int | None = None  # of the leader whose spool readers here follow
    loop = asyncio.get_running_loop()
    check_at = loop.time() + LOCK_CHECK
    try:
        while True:
            seen = claim.progress()
            if seen is not None and seen.state != STARTING:
                if generation is not None and seen.generation != generation:
                    # Another process took over after the one we followed died: its spool
                    # is another file, which readers here have not opened.
                    flight.fail(LeaderLost("the process fetching this blob stopped"))
                    return None
                if seen.state == FAILED:
                    code, message, status = seen.error or ("UNAVAILABLE", "fetch failed", 502)
                    flight.fail(RegistryError(code, message, status))
                    return None
                generation = seen.generation
                flight.mirror(seen.spool, seen.size, seen.written, seen.state == VERIFIED)
                if seen.state == VERIFIED:
                    return None
            if loop.time() >= check_at:
                check_at = loop.time() + LOCK_CHECK
                lead = await claim.leader_gone()
                if lead is not None:
                    if generation is None:
                        return lead  # nobody here has seen a byte: fetch it ourselves
                    await lead.release()
                    flight.fail(LeaderLost("the process fetching this blob stopped"))
                    return None
            await asyncio.sleep(POLL)
    except BaseException as exc:
        if flight.error is None and not flight.done:
            flight.fail(exc if isinstance(exc, Exception) else LeaderLost("shutting down"))
        raise
    finally:
        await claim.close()
