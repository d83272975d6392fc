"""Release the addresses of containers that went away without telling us.

An allocation may carry a liveness anchor: {"netns": PATH} (gone once the path is) or
{"pid": N, "start_time": T} (gone once no process N started at T). Every interval the sweeper
looks; an allocation older than one interval whose own anchor is gone is released, so a
container that vanished loses its addresses within two intervals.

Absence needs evidence (DESIGN.md rule 10): an anchor is gone only on ENOENT for the netns
path, or ESRCH/ENOENT for the pid (or a start time that differs). Any other error (EMFILE,
EACCES, EIO, a slow filesystem) keeps the allocation, and is logged and counted. The checks run
in a thread with a time bound, off the event loop. What is found dead is released through the
core (ReleaseIf), which releases an address only while it is still the allocation judged.
"""
from __future__ import annotations

import json
import logging

import trio

from .core.messages import ReleaseIf
from .liveness import ALIVE, GONE, UNKNOWN, path_state, pid_state  # noqa: F401 (re-exported)

log = logging.getLogger("ipamd")
CHECK_TIMEOUT = 10.0  # seconds for one sweep's filesystem checks


def anchor_state(anchor: str) -> tuple[str, str]:
    """(ALIVE | GONE | UNKNOWN, why). GONE only on positive proof."""
    try:
        a = json.loads(anchor)
    except ValueError:
        return UNKNOWN, "anchor is not JSON"
    if not isinstance(a, dict):
        return UNKNOWN, "anchor is not an object"
    if "netns" in a:
        return path_state(a["netns"])
    pid = a.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return UNKNOWN, "anchor has neither netns nor a valid pid"
    return pid_state(pid, a.get("start_time"))


def candidates(allocator, now: float, min_age: float) -> list[tuple[str, int, int, float, str]]:
    """Anchored allocations old enough to be judged: (handle, family, address, at, anchor)."""
    return [(h.handle, h.family, h.address, h.allocated_at, h.anchor)
            for h in list(allocator.by_addr.values())
            if h.anchor and now - h.allocated_at >= min_age]


def judge(found: list[tuple[str, int, int, float, str]]) -> tuple[dict, list[str]]:
    """Check every anchor once (blocking I/O: run in a thread). Returns the allocations
    proven dead, by handle, and the reasons for those that could not be judged."""
    states: dict[str, tuple[str, str]] = {}
    dead: dict[str, list[tuple[int, int, float]]] = {}
    unknown = []
    for handle, family, address, at, anchor in found:
        if anchor not in states:
            states[anchor] = anchor_state(anchor)
        state, why = states[anchor]
        if state == GONE:
            dead.setdefault(handle, []).append((family, address, at))
        elif state == UNKNOWN:
            unknown.append(f"{handle}: {why}")
    return dead, unknown


class Sweeper:
    def __init__(self, core, interval: float):
        self.core, self.interval = core, interval
        self.swept = 0
        self.undecided = 0  # anchors that could not be judged (kept), since start

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.sweep()

    async def sweep(self) -> None:
        found = candidates(self.core.allocator, self.core.clock(), self.interval)
        if not found:
            return
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                dead, unknown = await trio.to_thread.run_sync(judge, found,
                                                              abandon_on_cancel=True)
        except trio.TooSlowError:
            self.undecided += len(found)
            log.warning("event=sweep_skipped reason=%r",
                        f"anchor checks took over {CHECK_TIMEOUT:g}s; nothing released")
            return
        except RuntimeError as e:  # no thread to be had (resources exhausted): judge nothing
            self.undecided += len(found)
            log.warning("event=sweep_skipped reason=%r", str(e))
            return
        if unknown:
            self.undecided += len(unknown)
            log.warning("event=sweep_undecided count=%d first=%r", len(unknown), unknown[0])
        for handle, allocations in dead.items():
            try:
                reply = await self.core.submit(ReleaseIf(handle, tuple(allocations)))
            except Exception as e:  # a failed commit or a core bug: next sweep tries again
                log.error("event=sweep_failed handle=%r error=%r", handle, str(e))
                return
            released = reply.get("released", []) if reply["ok"] else []
            if released:
                self.swept += len(released)
                log.warning("event=swept handle=%r released=%s", handle, ",".join(released))
