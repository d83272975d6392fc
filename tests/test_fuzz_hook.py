"""Bad input on the hook socket: hypothesis-generated lines and raw bytes.

Every one gets an error reply or a closed connection; afterwards the daemon still answers, and
neither its allocations nor its database have changed.
"""
import json
import re
import socket

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .daemon_proc import Daemon

OPS = ["allocate", "claim", "release", "lookup", "list", "status", "cni", "leave", "rmpeer",
       "range_add", "range_retire", "tenant_create", "tenant_grow", "tenant_delete",
       "lease_block", "names_create", "lease_name", "claim_name"]
# Text that no tenant or pool may be named: empty, too long, or a character outside
# [a-z0-9._-], or a first one outside [a-z0-9].
BAD_NAME = st.just("") | st.text(min_size=64, max_size=80, alphabet="abc") | \
    st.text(max_size=10).filter(lambda t: not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", t))
NOT_STR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                          st.integers(), max_size=2))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@st.composite
def invalid_requests(draw):
    """JSON objects that cannot be a valid request, each in its own way."""
    kind = draw(st.sampled_from(["no_op", "bad_op", "op_type", "handle_type", "no_handle",
                                 "bad_handle", "bad_subnet", "bad_address", "bad_anchor",
                                 "bad_version", "bad_range", "bad_range_flag", "bad_tenant",
                                 "bad_prefix_len", "bad_family", "bad_pool", "bad_pattern"]))
    op = draw(st.sampled_from(["allocate", "claim", "release", "lookup"]))
    req = {"op": op, "handle": draw(st.text(min_size=1, max_size=20).filter(str.isprintable))}
    if op == "claim":
        req["address"] = "10.20.0.9"
    extra = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in (
        "op", "v", "handle", "subnet", "address", "anchor", "range", "undo",
        "allow_route_overlap", "blocks", "tenant", "prefix_len", "family", "max_blocks",
        "force", "pool", "pattern", "name")), JSONISH, max_size=3))
    req.update(extra)  # unknown fields are ignored, so they cannot make a request valid
    if kind == "no_op":
        del req["op"]
    elif kind == "bad_op":
        req["op"] = draw(st.text().filter(lambda o: o not in OPS))
    elif kind == "op_type":
        req["op"] = draw(NOT_STR)
    elif kind == "handle_type":
        req["handle"] = draw(NOT_STR)
    elif kind == "no_handle":
        del req["handle"]
    elif kind == "bad_handle":
        req["handle"] = draw(st.just("") | st.text(min_size=256) |
                             st.text(min_size=1).map(lambda t: t + "\n"))
    elif kind == "bad_subnet":
        req["op"] = "allocate"  # the ops that read a subnet
        req["subnet"] = draw(NOT_STR.filter(lambda x: x is not None) |
                             st.text().filter(lambda t: "/" not in t) | st.just("10.20.0.5/24"))
    elif kind == "bad_address":
        req["op"] = "claim"
        req["address"] = draw(NOT_STR | st.text(max_size=12).filter(lambda t: ":" not in t
                                                                    and "." not in t))
    elif kind == "bad_anchor":
        req["op"] = "allocate"
        req["anchor"] = draw(st.dictionaries(st.sampled_from(["netns", "pid", "x"]), NOT_STR,
                                             min_size=1).filter(lambda a: a.get("pid") is None or
                                                                type(a["pid"]) is not int))
    elif kind == "bad_range":  # range_add and range_retire name a CIDR block, host bits zero
        req["op"] = draw(st.sampled_from(["range_add", "range_retire"]))
        req["range"] = draw(NOT_STR | st.text().filter(lambda t: "/" not in t) |
                            st.sampled_from(["10.20.0.5/24", "10.20.0.0/33", "fd00::1/64"]))
    elif kind == "bad_range_flag":  # a good range, but a flag that is not true or false
        req["op"], flag = draw(st.sampled_from([("range_add", "allow_route_overlap"),
                                                ("range_retire", "undo")]))
        req["range"] = "10.20.0.0/24"
        req[flag] = draw(NOT_STR.filter(lambda v: type(v) is not bool))
    elif kind == "bad_tenant":  # a tenant's name, where every op that takes one reads it
        req["op"] = draw(st.sampled_from(["tenant_create", "tenant_grow", "tenant_delete",
                                          "allocate", "claim"]))
        req.update(address="10.20.0.9", prefix_len=24, tenant=draw(NOT_STR.filter(
            lambda x: x is not None or req["op"].startswith("tenant_")) | BAD_NAME))
    elif kind == "bad_prefix_len":  # not an int, or out of 1..32 (IPv4) / 1..64 (IPv6)
        req["op"] = draw(st.sampled_from(["tenant_create", "lease_block"]))
        req["tenant"], req["family"] = "acme", draw(st.sampled_from([4, 6]))
        req["prefix_len"] = draw(NOT_STR | st.integers(max_value=0) |
                                 st.integers(min_value=33 if req["family"] == 4 else 65))
    elif kind == "bad_family":
        req["op"] = draw(st.sampled_from(["tenant_create", "lease_block"]))
        req.update(tenant="acme", prefix_len=24, family=draw(
            NOT_STR.filter(lambda x: x is not None) | st.integers().filter(
                lambda f: f not in (4, 6))))
    elif kind == "bad_pool":
        req["op"] = draw(st.sampled_from(["names_create", "lease_name", "claim_name"]))
        req.update(pattern="web-{1..9}", name="web-1", pool=draw(NOT_STR | BAD_NAME))
    elif kind == "bad_pattern":  # no {first..last}, counting down, or bad characters
        req["op"], req["pool"] = "names_create", "web"
        req["pattern"] = draw(NOT_STR | st.text(max_size=20).filter(lambda t: "{" not in t) |
                              st.sampled_from(["web-{9..1}", "Web-{1..9}", "w{1..2}{3..4}",
                                               "web-{01..100}", "web {1..9}"]))
    elif kind == "bad_version":
        req["v"] = draw(NOT_STR.filter(lambda v: v != 1 or v is True))
    return json.dumps(req).encode()


RAW = st.binary(max_size=300).filter(lambda b: b'"op"' not in b)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), "--iprange", "10.20.0.0/24")
    d.start()
    for i in range(5):
        assert d.call({"op": "allocate", "handle": f"keep-{i}"})["ok"]
    before = d.call({"op": "list"})
    db = apsw.Connection(f"file:{d.db}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY |
                         apsw.SQLITE_OPEN_URI)
    rows = db.execute("SELECT * FROM allocations ORDER BY address").fetchall()
    yield d, before
    assert db.execute("SELECT * FROM allocations ORDER BY address").fetchall() == rows
    assert db.execute("SELECT count(*) FROM freed").fetchall() == [(0,)]
    db.close()
    d.stop()


def exchange(d, payload: bytes) -> dict | None:
    """Send payload; the reply, or None when the daemon hung up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(d.socket))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            return None
        line = s.makefile("rb").readline()
    return json.loads(line) if line else None


def check_unchanged(d, before):
    assert d.call({"op": "list"}) == before


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(line=invalid_requests())
def test_invalid_requests_get_errors(daemon, line):
    d, before = daemon
    reply = exchange(d, line + b"\n")
    assert reply is not None and reply["ok"] is False and reply["error"]["message"]
    check_unchanged(d, before)


@FUZZ
@given(data=RAW)
def test_raw_bytes_get_errors_or_close(daemon, data):
    d, before = daemon
    reply = exchange(d, data + b"\n")
    if data.strip():
        assert reply is None or reply["ok"] is False
    check_unchanged(d, before)


@FUZZ
@given(data=st.binary(max_size=200).filter(lambda b: b'"op"' not in b and b"\n" not in b))
def test_unterminated_bytes_then_hangup(daemon, data):
    d, before = daemon
    reply = exchange(d, data)  # no newline: the daemon sees only a half line and a hang-up
    assert reply is None
    check_unchanged(d, before)
