"""Runs a parsed CNI call against the allocator. Pure: returns (stdout, exit code, rows).

Every request of one call goes through the allocator in one go and the daemon commits their rows
in one transaction, so the runtime never sees a result that a crash could take back. A half-done
ADD (one range set served, the next one not) is rolled back before the error is returned.
"""
from __future__ import annotations

import json

from .core import messages as m
from .core.allocator import Allocator
from .core.messages import Row
from .protocols import cni
from .protocols.cni import Call, CniError, Range

_REFUSALS = {"bad_subnet": cni.BAD_CONFIG, "bad_address": cni.BAD_CONFIG}


def run(call: Call, allocator: Allocator, now: float) -> tuple[bytes, int, list[Row]]:
    rows: list[Row] = []
    try:
        out = _dispatch(call, allocator, now, rows)
    except CniError as e:
        return cni.error_result(e, call.version), 1, rows
    return out, 0, rows


def _apply(allocator: Allocator, req, now: float, rows: list[Row]) -> dict:
    reply, r = allocator.apply(req, now)
    rows.extend(r)
    return reply


def _dispatch(call: Call, a: Allocator, now: float, rows: list[Row]) -> bytes:
    if call.command == "VERSION":
        return cni.version_result()
    if call.command == "ADD":
        return _add(call, a, now, rows)
    if call.command == "DEL":
        _apply(a, m.Release(call.handle), now, rows)
        return b""
    if call.command == "CHECK":
        _check(call, a)
        return b""
    if call.command == "GC":
        prefix = f"cni/{call.name}/"
        for handle in [h for h in a.by_handle if h.startswith(prefix)]:
            cid, _, ifname = handle[len(prefix):].partition("/")
            if (cid, ifname) not in call.valid:
                _apply(a, m.Release(handle), now, rows)
        return b""
    if call.command == "STATUS":
        for i, rs in enumerate(call.range_sets):
            if not any(a.can_allocate(r.subnet, (r.first, r.last), now) for r in rs):
                raise CniError(cni.NOT_AVAILABLE, f"range set {i} has no free address on "
                               "this host")
        return b""
    raise AssertionError(call.command)  # parse_call admits no other


def _add(call: Call, a: Allocator, now: float, rows: list[Row]) -> bytes:
    anchor = json.dumps({"netns": call.netns}, sort_keys=True)
    taken: list[tuple[int, int]] = []  # new in this call, to undo on failure
    held_before = {(h.family, h.address) for h in a.by_handle.get(call.handle, {}).values()}
    result: list[tuple[str, Range]] = []
    try:
        for i, rs in enumerate(call.range_sets):
            want = [ip for ip in call.ips if any(ip in r for r in rs)]
            if len(want) > 1:
                raise CniError(cni.BAD_CONFIG, f"more than one requested IP for range set {i}")
            reply, r = _one_set(call, a, now, rows, rs, want[0] if want else None, anchor, i)
            key = (r.subnet.family, a.by_handle[call.handle][r.subnet].address)
            if key not in held_before:
                taken.append(key)
            result.append((reply["address"], r))
    except CniError:
        for key in taken:
            _apply(a, m.Release(call.handle, key), now, rows)
        raise
    return cni.add_result(call, result)


def _one_set(call, a, now, rows, rs: list[Range], ip, anchor: str, i: int):
    last = None
    for r in rs:
        if ip is not None:
            if ip not in r:
                continue
            reply = _apply(a, m.Claim(call.handle, ip[0], ip[1], r.subnet, anchor), now, rows)
        else:
            reply = _apply(a, m.Allocate(call.handle, r.subnet, anchor, (r.first, r.last),
                                         r.gateway), now, rows)
        if reply["ok"]:
            return reply, r
        last = reply["error"]
        if last["code"] != "exhausted":
            break
    code = _REFUSALS.get(last["code"], cni.REFUSED)
    raise CniError(code, f"failed to allocate for range set {i}: {last['message']}",
                   last["code"])


def _check(call: Call, a: Allocator) -> None:
    held = a.by_handle.get(call.handle, {})
    if not held:
        raise CniError(cni.UNKNOWN_CONTAINER, f"no address is held for {call.handle}")
    for i, rs in enumerate(call.range_sets):
        if not any((h.family, h.address) in r for h in held.values() for r in rs):
            raise CniError(cni.UNKNOWN_CONTAINER,
                           f"{call.handle} holds no address of range set {i}")
