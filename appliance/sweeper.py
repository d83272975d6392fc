"""Release the addresses of containers that went away without telling us.

An allocation may carry a liveness anchor: {"netns": PATH} (gone once the path is) or
{"pid": N, "start_time": T} (gone once no process N started at T). Every interval the sweeper
looks; an allocation older than one interval whose anchor is gone is released, so a container
that vanished loses its addresses within two intervals.
"""
from __future__ import annotations

import json
import logging
import os

import trio

from .core.messages import Release

log = logging.getLogger("ipamd")


def anchor_alive(anchor: str) -> bool:
    a = json.loads(anchor)
    if "netns" in a:
        return os.path.lexists(a["netns"])
    try:
        with open(f"/proc/{a['pid']}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    if "start_time" not in a:
        return True
    # Field 22, counted after the command name, which may hold spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[19]) == a["start_time"]


def is_dead(allocator, now: float, min_age: float, handle: str) -> bool:
    """Every anchored address of the handle is old enough and its anchor is gone."""
    anchored = [h for h in allocator.by_handle.get(handle, {}).values() if h.anchor]
    return bool(anchored) and all(now - h.allocated_at >= min_age and not anchor_alive(h.anchor)
                                  for h in anchored)


class Sweeper:
    def __init__(self, core, interval: float):
        self.core, self.interval = core, interval
        self.swept = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.sweep()

    async def sweep(self) -> None:
        a, now = self.core.allocator, self.core.clock()
        for handle in [h for h in list(a.by_handle) if is_dead(a, now, self.interval, h)]:
            released = await self.core.submit_fn(lambda a, now, h=handle: self._release(a, now, h))
            if released:
                self.swept += len(released)
                log.warning("event=swept handle=%s released=%s", handle, ",".join(released))

    def _release(self, allocator, now: float, handle: str):
        # Checked again at the moment of release: the handle may have been given a new,
        # live anchor while an earlier release in this sweep waited for its commit.
        if not is_dead(allocator, now, self.interval, handle):
            return [], []
        reply, rows = allocator.apply(Release(handle), now)
        return reply["released"], rows

